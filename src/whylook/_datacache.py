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
most :data:`MAX_ENTRIES` sources are kept, the least recently used going first; deleting
the folder is always safe.

An entry is used only while its source is unchanged: the key holds the source's path and,
for each of its files, size, modification and status-change times (nanoseconds) and inode;
for a single file (npz, zip, the CSV) also a hash of its first and last 64 KiB, which in a
zip or npz holds the CRC-32 of every member. Entries are written to a temporary folder and
renamed into place, so a reader sees a whole entry or none; an entry that fails to read is
removed and the source decoded again. When the cache cannot be written (a read-only home,
a full disk) loading goes on without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from whylook._io import atomic_write, write_json
from whylook.errors import WhylookError

__all__ = ["MAX_ENTRIES", "Entry", "cache_dir", "read", "source_key", "write"]

#: Sources kept; the least recently used entry is removed when a new one would exceed it.
MAX_ENTRIES = 8
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
    """The folder of decoded sources, or None when ``WHYLOOK_CACHE=off``."""
    env = os.environ.get("WHYLOOK_CACHE", "").strip()
    if env.lower() in {"off", "0", "false", "no"}:
        return None
    if env:
        return Path(env).expanduser() / "data"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "whylook" / "data"


def _file_state(path: Path, root: Path) -> list[Any]:
    st = path.stat()
    return [path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            st.st_ino]


def _edges(path: Path, size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        h.update(fh.read(_EDGE_BYTES))
        if size > _EDGE_BYTES:
            fh.seek(max(_EDGE_BYTES, size - _EDGE_BYTES))
            h.update(fh.read(_EDGE_BYTES))
    return h.hexdigest()


def _state(path: Path) -> list[Any]:
    """What must stay the same for an entry of ``path`` (a file or a folder) to be used."""
    if path.is_file():
        state = _file_state(path, path.parent)
        return [state, _edges(path, int(state[1]))]
    if not path.is_dir():
        raise FileNotFoundError(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    # Folders count too: an emptied class folder changes what the loader reports.
    folders = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_dir())
    return [[_file_state(p, path) for p in files], folders]


def source_key(kind: str, paths: list[Path], loader_limit: int | None) -> str | None:
    """The entry name of a source read from ``paths``; None when a path cannot be read
    (the loader then reports it)."""
    try:
        states = [[str(p), _state(p)] for p in paths]
    except OSError:
        return None
    blob = json.dumps([_VERSION, kind, loader_limit, states], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


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
        if meta.get("version") != _VERSION or meta.get("key") != key:
            raise ValueError("another version's entry")
        arrays = {}
        for name in _ARRAYS:
            mapped = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            spec = meta["arrays"][name]
            if list(mapped.shape) != spec["shape"] or mapped.dtype.str != spec["dtype"]:
                raise ValueError(f"{name} is not as recorded")
            # A plain ndarray over the mapping: callers see the arrays a loader returns.
            arrays[name] = mapped.view(np.ndarray)
        classes = tuple(str(c) for c in meta["classes"])
        digest = str(meta["digest"])
    except (OSError, ValueError, KeyError, TypeError):
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


def _entries(root: Path) -> Iterator[tuple[float, Path]]:
    for folder in root.iterdir():
        if folder.name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                # A temporary folder an interrupted process left behind.
                if time.time() - folder.stat().st_mtime > _STALE_TEMP_SECONDS:
                    _remove(folder)
            continue
        try:
            yield (folder / _META).stat().st_mtime, folder
        except OSError:
            continue


def _prune(root: Path, keep: str) -> None:
    entries = sorted(_entries(root), reverse=True)
    for _, folder in entries[MAX_ENTRIES:]:
        if folder.name != keep:
            _remove(folder)


def _remove(folder: Path) -> None:
    # A process still reading a removed entry keeps its open files and mappings (POSIX).
    shutil.rmtree(folder, ignore_errors=True)
