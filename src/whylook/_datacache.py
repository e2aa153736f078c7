"""Decoded data sources kept on disk between processes, read back memory-mapped.

Every command that opens a run loads its data source again: ``train``, ``explain``,
``finetune``, ``report``'s sample images. Decoding is the slow part of that, and it does
not change between commands: the CIFAR-10 JPEG zip takes about 12 s to decode on a 2-core
Xeon, full MNIST's compressed npz 0.2 s with its content hash, ``mnist5k``'s CSV 0.1 s
(``benchmarks/RESULTS.md``, "Decoded data on disk"). The first load of a source writes its
decoded arrays here as plain ``.npy`` files; later loads map them (read-only, nothing is
copied until a row is used) and take the content hash stored beside them.

Where: ``$WHYLOOK_CACHE/data`` when ``WHYLOOK_CACHE`` is set (``WHYLOOK_CACHE=off`` turns
the cache off), else ``$XDG_CACHE_HOME/whylook/data``, else ``~/.cache/whylook/data``. At
most :data:`MAX_ENTRIES` sources and :data:`MAX_BYTES` bytes are kept, the least recently
used going first; deleting the folder is always safe.

An entry is used only while its source is unchanged: the key holds the source's path and,
for each of its files, size, modification and status-change times (nanoseconds) and inode,
for a folder also its subfolders; for a single file (npz, zip, the CSV) a hash of its first
and last 64 KiB and, in a zip or npz, of the central directory that lists every member's
CRC-32. The key also holds whylook's loaders (data.py's bytes) and the versions of numpy,
Pillow and torchvision, so another build never reads an entry it did not write. A cut load
(``limit_per_class`` on a source other than a folder) reads an entry but writes none, and
a source that changed while it was decoded is not stored. Entries are written to a
temporary folder and renamed into place, so a reader sees a whole entry or none; an entry
that fails to read, whatever the failure, is removed and the source decoded again. When
the cache cannot be written (a read-only home, a full disk, no home at all) loading goes
on without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from whylook._io import atomic_write, write_json
from whylook.errors import WhylookError

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "Entry", "cache_dir", "read", "source_key", "write"]

#: Sources kept, and their bytes at most; the least recently used entries go first.
MAX_ENTRIES = 8
MAX_BYTES = 4 << 30
#: Changes whenever an entry's layout or the loaders' output changes: older entries are
#: then never matched (and age out).
_VERSION = 1
_EDGE_BYTES = 64 * 1024
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
_META = "meta.json"
_STALE_TEMP_SECONDS = 3600.0

# (classes, {array name: array}, digest of the arrays as DataSource.digest computes it)
Entry = tuple[tuple[str, ...], dict[str, np.ndarray], str]


def cache_dir() -> Path | None:
    """The folder of decoded sources, or None when ``WHYLOOK_CACHE=off`` or when there is
    no home folder to put it in (a container user without one)."""
    env = os.environ.get("WHYLOOK_CACHE", "").strip()
    if env.lower() in {"off", "0", "false", "no"}:
        return None
    try:
        if env:
            return Path(env).expanduser() / "data"
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = Path(xdg) if xdg else Path.home() / ".cache"
    except (RuntimeError, OSError, KeyError):  # Path.home() without HOME or a passwd entry
        return None
    return base / "whylook" / "data"


def _file_state(name: str, st: os.stat_result) -> list[Any]:
    return [name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _edges(path: Path) -> str:
    """A hash of the file's first and last 64 KiB and, for a zip (an npz is one), of its
    whole central directory, which holds every member's CRC-32 and size."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        h.update(fh.read(_EDGE_BYTES))
        tail_at = max(0, fh.seek(0, os.SEEK_END) - _EDGE_BYTES)
        fh.seek(tail_at)
        tail = fh.read(_EDGE_BYTES)
        h.update(tail)
        # The end-of-central-directory record: its last occurrence in the tail.
        end = tail.rfind(b"PK\x05\x06")
        if end >= 0 and end + 22 <= len(tail):
            cd_size, cd_offset = struct.unpack("<II", tail[end + 12 : end + 20])
            if cd_offset != 0xFFFFFFFF and cd_offset + cd_size <= tail_at + end:
                fh.seek(cd_offset)
                h.update(fh.read(cd_size))
    return h.hexdigest()


def _state(path: Path) -> list[Any]:
    """What must stay the same for an entry of ``path`` (a file or a folder) to be used."""
    if path.is_file():
        return [_file_state(path.name, path.stat()), _edges(path)]
    if not path.is_dir():
        raise FileNotFoundError(path)
    files: list[list[Any]] = []
    # Folders count too: an emptied class folder changes what the loader reports.
    folders: list[str] = []
    _walk(path, "", files, folders)
    return [sorted(files), sorted(folders)]


def _walk(folder: Path, prefix: str, files: list[list[Any]], folders: list[str]) -> None:
    # os.scandir, not Path.rglob: 60,000 files (CIFAR-10 as a folder) in 0.4 s, not 1.7 s.
    with os.scandir(folder) as entries:
        for entry in entries:
            name = prefix + entry.name
            if entry.is_dir():
                folders.append(name)
                # Not into a link to a folder, as the loader's rglob does not go (a link
                # to a parent would never end).
                if not entry.is_symlink():
                    _walk(Path(entry.path), name + "/", files, folders)
            elif entry.is_file():
                files.append(_file_state(name, entry.stat()))


def source_key(kind: str, paths: list[Path], loader_limit: int | None) -> str | None:
    """The entry name of a source read from ``paths``; None when a path cannot be read
    (the loader then reports it)."""
    try:
        states = [[str(p), _state(p)] for p in paths]
    except OSError:
        return None
    blob = json.dumps([_VERSION, _build(kind), kind, loader_limit, states],
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@functools.cache
def _build(kind: str) -> tuple[str, ...]:
    """What decodes a source of ``kind``: whylook's loaders (data.py's own bytes, so an
    edited or upgraded loader never reads another's entries) and the libraries they call.
    Versions are read without importing what is not loaded yet (torchvision takes seconds)
    and without package metadata (60 ms)."""
    import whylook

    versions = [whylook.__version__, np.__version__, hashlib.sha256(
        (Path(__file__).parent / "data.py").read_bytes()).hexdigest()]
    if kind == "folder" or kind.startswith("torchvision"):
        import PIL

        versions.append(f"pillow {PIL.__version__}")
        # folder: torchvision's decoder for large trees; torchvision: its datasets.
        versions.append(f"torchvision {_torchvision_version()}")
    return tuple(versions)


def _torchvision_version() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "-"
    version_file = Path(spec.origin).parent / "version.py"
    try:
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
    except OSError:
        return "?"
    return match.group(1) if match else "?"


def read(key: str) -> Entry | None:
    """The entry ``key`` with its arrays memory-mapped read-only, or None (an unreadable
    entry is removed)."""
    root = cache_dir()
    if root is None:
        return None
    folder = root / key
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / _META).read_text())
        if not isinstance(meta, dict) or meta.get("version") != _VERSION or meta.get("key") != key:
            raise ValueError("not an entry of this version")
        arrays = {}
        for name in _ARRAYS:
            mapped = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            spec = meta["arrays"][name]
            if (not isinstance(mapped, np.ndarray) or list(mapped.shape) != spec["shape"]
                    or mapped.dtype.str != spec["dtype"]):
                raise ValueError(f"{name} is not as recorded")
            # A plain ndarray over the mapping: callers see the arrays a loader returns.
            arrays[name] = mapped.view(np.ndarray)
        classes = tuple(str(c) for c in meta["classes"])
        digest = str(meta["digest"])
    except Exception:  # whatever is wrong with an entry, decoding the source replaces it
        _remove(folder)
        return None
    with contextlib.suppress(OSError):
        os.utime(folder / _META)  # least recently used goes first
    return classes, arrays, digest


def write(key: str, entry: Entry) -> bool:
    """Store ``entry`` under ``key``; False when the cache is off or cannot be written."""
    root = cache_dir()
    if root is None:
        return False
    classes, arrays, digest = entry
    temp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        for name in _ARRAYS:
            atomic_write(temp / f"{name}.npy", functools.partial(
                _save_npy, np.ascontiguousarray(arrays[name])))
        meta = {
            "version": _VERSION,
            "key": key,
            "classes": list(classes),
            "digest": digest,
            "arrays": {n: {"shape": list(arrays[n].shape), "dtype": arrays[n].dtype.str}
                       for n in _ARRAYS},
        }
        write_json(temp / _META, meta)
        try:
            temp.rename(root / key)
        except OSError:
            # Another process stored the same source first; its entry is as good.
            if not (root / key).is_dir():
                raise
            _remove(temp)
        temp = None
        _prune(root, keep=key)
        return True
    except (OSError, WhylookError):  # WhylookError: _io's word for an unwritable path
        if temp is not None:
            _remove(temp)
        return False


def _save_npy(array: np.ndarray, fh: io.BufferedWriter) -> None:
    np.save(fh, array, allow_pickle=False)


def _entries(root: Path) -> Iterator[tuple[float, int, Path]]:
    """(last use, bytes, folder) of each entry."""
    for folder in root.iterdir():
        if folder.name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                # A temporary folder an interrupted process left behind.
                if time.time() - folder.stat().st_mtime > _STALE_TEMP_SECONDS:
                    _remove(folder)
            continue
        try:
            used = (folder / _META).stat().st_mtime
            size = sum(f.stat().st_size for f in folder.iterdir())
        except OSError:
            continue
        yield used, size, folder


def _prune(root: Path, keep: str) -> None:
    """Remove the least recently used entries beyond MAX_ENTRIES or MAX_BYTES (``keep``,
    the entry just written, stays whatever its size)."""
    total = 0
    for rank, (_, size, folder) in enumerate(sorted(_entries(root), reverse=True)):
        total += size
        if folder.name != keep and (rank >= MAX_ENTRIES or total > MAX_BYTES):
            _remove(folder)


def _remove(folder: Path) -> None:
    # A process still reading a removed entry keeps its open files and mappings (POSIX).
    shutil.rmtree(folder, ignore_errors=True)
