"""Atomic file writes, run-folder locks and safe weight loading.

Nothing whylook writes is ever observed half-written: each artifact goes to a temporary
file in the same folder and is renamed into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from whylook.errors import WhylookError, option

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_write",
    "file_digest",
    "json_text",
    "load_weights",
    "read_json",
    "remove_temporaries",
    "run_lock",
    "save_npz",
    "save_weights",
    "write_json",
]


#: Left in a run folder while train or import writes it (removed when the run is complete).
INCOMPLETE_MARKER = ".whylook-incomplete"


def require_run_folder(path: str | os.PathLike[str] | Any) -> Path:
    """``path`` as a Path if it is a complete run folder (it holds ``run.json``), else the
    one-line WhylookError that says why not: missing, a file, incomplete or not a run.

    A :class:`~whylook.run.RunFolder` (what ``train`` and ``import_checkpoints`` return) and an
    :class:`~whylook.explain.Explanation` (what ``explain`` returns) stand for their folder.

    >>> require_run_folder("no/such/run")
    Traceback (most recent call last):
    whylook.errors.WhylookError: run folder no/such/run does not exist
    """
    run_module = sys.modules.get("whylook.run")  # no RunFolder exists without it
    if run_module is not None and isinstance(path, run_module.RunFolder):
        path = path.path
    explain_module = sys.modules.get("whylook.explain")  # no Explanation exists without it
    if explain_module is not None and isinstance(path, explain_module.Explanation):
        path = path.path.parent
    if not isinstance(path, str | os.PathLike):
        raise WhylookError(f"the run folder must be a path (str or os.PathLike), not {path!r:.60}")
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise WhylookError(
                f"{path} is a file, not a run folder; give the folder that 'whylook train' or "
                "'whylook import' created"
            )
        raise WhylookError(f"run folder {path} does not exist")
    if not (path / "run.json").is_file():
        if (path / INCOMPLETE_MARKER).exists():
            raise WhylookError(
                f"run folder {path} is incomplete (its training or import stopped before "
                f"the end); run that command again with the same {option('out')} to redo it"
            )
        raise WhylookError(
            f"{path} is not a whylook run folder (no run.json); create one with "
            "'whylook train' or 'whylook import'"
        )
    return path


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[io.BufferedWriter], object]
) -> Path:
    """Write ``path`` through ``write(fileobj)`` so that it appears whole or not at all.

    A path that cannot be written (a file where a folder should be, no permission, a full
    disk) is a :class:`WhylookError` of one line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    # mkstemp creates 0600 files; results are meant to be shared like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _unwritable(path, exc) from None
        raise
    return path


def remove_temporaries(folder: str | os.PathLike[str], names: str = "*") -> None:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for files named
    like ``names`` (a glob) when its process was killed. They are never read, but would pile
    up; call it only under the run's lock, where no other command can be writing them."""
    for tmp in Path(folder).glob(f".{names}.*.tmp"):
        tmp.unlink(missing_ok=True)


def _unwritable(path: Path, exc: OSError) -> WhylookError:
    # mkdir reports a file in the way as "File exists", which does not say which one.
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    reason = (f"{blocker} is a file, not a folder" if blocker is not None
              else f"{type(exc).__name__}: {exc.strerror or exc}")
    return WhylookError(f"cannot write {path} ({reason}); choose a location you can write")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON deterministically (sorted keys, fixed layout) and atomically.

    The layout is :func:`json_text`'s: one line per key of the top two levels and per
    entry of their lists of records.
    """
    return write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """The content :func:`write_json` writes: to fail on an unwritable value (NaN) before
    any file is touched."""
    return (json_text(obj) + "\n").encode()


#: One encoder for every compact piece: ``json.dumps`` with options builds a new one per call.
_COMPACT = json.JSONEncoder(sort_keys=True, allow_nan=False)


def json_text(obj: Any, depth: int = 0) -> str:
    """JSON of ``obj`` with sorted keys: the keys of the top two levels of dicts one per
    line, each entry of a list of records (dicts or lists) at those levels on a line of its
    own, and everything deeper on that line.

    ``json.dumps(indent=2)`` puts every number of every record on a line of its own, and
    with an indent Python's encoder runs in Python, not C: a thousand-class explanation
    (half a million class pairs) took 13 s to write that way, against 2.5 s without an
    indent. Here each line is one call of the C encoder, and a record is one line to read,
    grep or diff.

    >>> print(json_text({"b": [{"y": 1, "x": [2, 3]}, {"x": []}], "a": {"k": 1.5}}))
    {
      "a": {
        "k": 1.5
      },
      "b": [
        {"x": [2, 3], "y": 1},
        {"x": []}
      ]
    }
    """
    pad, end = "  " * (depth + 1), "  " * depth
    if depth < 2 and isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        lines = [f"{pad}{_COMPACT.encode(k)}: {json_text(v, depth + 1)}"
                 for k, v in sorted(obj.items())]
        return "{\n" + ",\n".join(lines) + f"\n{end}}}"
    if (depth < 2 and isinstance(obj, (list, tuple)) and obj
            and any(isinstance(v, (dict, list, tuple)) for v in obj)):
        return "[\n" + ",\n".join([pad + _COMPACT.encode(v) for v in obj]) + f"\n{end}]"
    return _COMPACT.encode(obj)


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into a one-line :class:`WhylookError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WhylookError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WhylookError(
            f"{what} {path} is corrupt ({exc.__class__.__name__}); delete it and rerun the "
            "command that wrote it"
        ) from None
    except OSError as exc:
        raise WhylookError(
            f"{what} {path} cannot be read ({exc.__class__.__name__}: {exc.strerror}); check "
            "that it is a file you may read"
        ) from None


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Save arrays uncompressed (so they can be memory-mapped) and atomically."""
    return atomic_write(path, lambda fh: np.savez(fh, **cast("dict[str, Any]", arrays)))


def save_weights(path: str | os.PathLike[str], state: Mapping[str, torch.Tensor]) -> Path:
    """Save a state dict as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return write_bytes(path, save(tensors))


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load weights without ever unpickling code.

    ``.safetensors`` files are read directly. ``.pt``/``.pth``/``.bin`` files go through
    ``torch.load(weights_only=True)``, which refuses pickled objects other than tensors and
    plain containers.
    """
    # Here, not at the top: reading a finished run (the report) needs no torch.
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WhylookError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WhylookError(
                f"checkpoint {path} is not a readable safetensors file ({exc}); re-export it "
                "with safetensors.torch.save_file"
            ) from None
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        try:
            # torch warns about odd pickles (protocol 4, legacy format) before refusing or
            # loading them; the outcome is reported here in one line, without its noise.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise WhylookError(
                f"checkpoint {path} cannot be loaded safely ({_unsafe_reason(exc)}); if you "
                f"trust it, convert it once with: {CONVERT_COMMAND}"
            ) from None
        obj = _weights_of(obj, path)
        if not isinstance(obj, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            raise WhylookError(
                f"checkpoint {path} does not hold a state dict of tensors; save "
                "model.state_dict() instead of the whole model"
            )
        return dict(obj)
    raise WhylookError(
        f"checkpoint {path} has an unknown extension {path.suffix!r}; use .safetensors, "
        ".pt, .pth, .bin or .ckpt"
    )


def _is_state_dict(obj: object) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _weights_of(obj: object, path: Path) -> object:
    """The state dict inside a training-state file (``{"model": ..., "optimizer": ...,
    "epoch": ...}``, Lightning's ``{"state_dict": ...}``): the one entry that is a dict of
    tensors. Several such entries (a model and its EMA copy) are ambiguous: refused."""
    if not isinstance(obj, Mapping) or _is_state_dict(obj):
        return obj
    found = [str(k) for k, v in obj.items() if _is_state_dict(v)]
    if len(found) > 1:
        raise WhylookError(
            f"checkpoint {path} holds several state dicts ({', '.join(found)}); save the one "
            "to analyse on its own (torch.save(ckpt['<name>'], path))"
        )
    return obj[found[0]] if found else obj


#: What the user can run, on a checkpoint they trust, to turn a pickle that whylook refuses
#: (a whole model, a training-state dict, tied weights) into a plain safetensors file. It
#: takes the first entry that holds weights, known names first: a "model" entry may only
#: name the architecture ({"model": "resnet18", "weights": ...}), and an optimizer has a
#: state_dict() too but is no nn.Module. A file without such an entry gives its own tensors.
CONVERT_COMMAND = (
    "python -c \"import torch, safetensors.torch as s; m = torch.load('IN.pt', "
    "weights_only=False); w = lambda v: v.state_dict() if isinstance(v, torch.nn.Module) "
    "else v; t = lambda v: isinstance(w(v), dict) and any(torch.is_tensor(x) for x in "
    "w(v).values()); m = w(m); m = w(next((m[k] for k in ('state_dict', 'model_state_dict', "
    "'model', 'net', *m) if k in m and t(m[k])), m)) if isinstance(m, dict) else m; "
    "s.save_file({k: v.detach().clone().contiguous() for k, v in m.items() if "
    "torch.is_tensor(v)}, 'OUT.safetensors')\""
)


def _unsafe_reason(exc: BaseException) -> str:
    """Why torch's weights-only loader refused a file, in a few words.

    torch's message runs over many lines (with terminal colour codes) and mostly advises
    loading with ``weights_only=False``, which is exactly what must not happen to a file
    from an unknown source.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if named:
        return f"it holds a pickled reference to {named[1]}, which loading would import and call"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        return f"not a weights-only pickle: {detail[1].strip()[:120]}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first[:160] or type(exc).__name__


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, used to key caches on the exact inputs."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on a run folder for the duration of a command.

    The lock is an OS-level ``flock``: it is released when the process dies, even on
    SIGKILL, so a crashed command never leaves a stale lock behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".whylook.lock", "a+")  # noqa: SIM115 - held open for the lock's life
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WhylookError(
                    f"run folder {folder} is in use by another whylook command; wait for it "
                    "to finish and try again"
                ) from None
            raise
        yield
    finally:
        fh.close()
