"""Read and check everything the report shows: run.json, the analysis, images, extras.

The report is read-only over the run folder. It checks the analysis against the output
contract (docs/ARCHITECTURE.md) before drawing anything, so a missing, corrupt
or inconsistent analysis becomes one line that says what to do, not a traceback halfway
through rendering.
"""

from __future__ import annotations

import functools
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whylook._io import read_json
from whylook.errors import WhylookError

SCHEMA = "whylook.explanation/1"

# name -> number of dimensions; the contract's arrays the report cannot do without.
_REQUIRED = {
    "sample_index": 1,
    "labels": 1,
    "assignments": 3,
    "saliency": 4,
    "confidence": 3,
    "beta": 3,
}
# Extra arrays (ARCHITECTURE.md) used when present; each has a fallback.
_OPTIONAL = ("beta_z", "beta_se", "intensity", "mass_share", "activity", "active",
             "class_groups", "confusion", "presence", "groups", "beta_group", "beta_group_z",
             "beta_group_key")
_PROTO = re.compile(r"^P-(\d+)$")


@dataclass(frozen=True)
class Inputs:
    """Everything one report is drawn from (arrays are in memory, rows = analysis set)."""

    run_path: Path
    run: dict[str, Any]
    explanation: dict[str, Any]
    arrays: dict[str, np.ndarray]
    classes: list[str]
    steps: list[int]
    test_accuracy: list[float | None]
    test_loss: list[float | None]
    images: np.ndarray | None  # (n, C, H, W) uint8, row r = training sample sample_index[r]
    image_note: str | None  # why the real images are not shown, when they are not
    finetune: tuple[Any, str | None] | None  # (content, error) of finetune/finetune.json
    compare: list[tuple[str, Any, str | None]] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.arrays["beta"].shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.arrays["assignments"].shape[1:]
        return int(h), int(w)

    @functools.cached_property
    def class_indices(self) -> dict[str, int]:
        # A dict, not list.index: a 1000-class run has tens of thousands of entries to map.
        indices: dict[str, int] = {}
        for i, name in enumerate(self.classes):
            indices.setdefault(name, i)
        return indices

    def class_index(self, name: Any) -> int:
        try:
            return self.class_indices[str(name)]
        except KeyError:
            raise inconsistent(self.run_path, f"unknown class {str(name)[:40]!r}") from None

    def proto_index(self, pid: Any) -> int:
        return proto_index(pid, self.k, self.run_path)


def _explain_first(run: Path, why: str) -> WhylookError:
    return WhylookError(f"{why}; run `whylook explain {run}` first")


def inconsistent(run: Path, what: str) -> WhylookError:
    return _explain_first(run, f"the analysis in {run} is inconsistent ({what})")


def proto_index(pid: Any, k: int, run: Path) -> int:
    """``"P-3"`` -> 3, checked against K."""
    m = _PROTO.match(str(pid))
    if not m or int(m.group(1)) >= k:
        raise inconsistent(run, f"bad prototype id {str(pid)[:40]!r} for K={k}")
    return int(m.group(1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load_explanation(run: Path) -> dict[str, Any]:
    path = run / "analysis" / "explanation.json"
    if not path.is_file():
        raise _explain_first(run, f"{run} has no analysis ({path} is missing)")
    try:
        exp = _read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise _explain_first(run, f"{path} is corrupt ({exc.__class__.__name__})") from None
    if not isinstance(exp, dict) or exp.get("schema") != SCHEMA:
        found = exp.get("schema") if isinstance(exp, dict) else type(exp).__name__
        raise _explain_first(run, f"{path} is not a {SCHEMA} file (schema {found!r})")
    for key, kind in (("classes", list), ("checkpoints", list), ("prototypes", list),
                      ("classes_explained", list)):
        if not isinstance(exp.get(key), kind):
            raise inconsistent(run, f"explanation.json has no list {key!r}")
    for key in ("uncertain_prototypes", "learning_order", "learning_patterns"):
        if not isinstance(exp.get(key, []), list):
            raise inconsistent(run, f"explanation.json {key!r} is not a list")
    for entry in exp.get("learning_patterns", []):
        if not _learning_pattern_ok(entry):
            raise inconsistent(run, f"a learning_patterns entry is malformed: {str(entry)[:80]}")
    return exp


def _learning_pattern_ok(e: Any) -> bool:
    """The fields the report reads from one ``learning_patterns`` entry, with their types
    (class names and prototype ids are checked against the run where they are used)."""
    def change(x: Any) -> bool:
        return isinstance(x, dict) and "class" in x and isinstance(x.get("change"), int | float)

    number = int | float
    return (
        isinstance(e, dict)
        and all(isinstance(e.get(key), int) for key in ("transition", "group", "size"))
        and isinstance(e.get("made_of"), list)
        and all(isinstance(c, dict) and "class" in c and isinstance(c.get("share"), number)
                for c in e["made_of"])
        and change(e.get("gained_most")) and change(e.get("lost_most"))
        and isinstance(e.get("steady", False), bool)
        and (e.get("prototypes") is None or (
            isinstance(e["prototypes"], list)
            and all(isinstance(d, dict) and "id" in d and isinstance(d.get("z"), number)
                    for d in e["prototypes"])))
    )


def _load_arrays(run: Path) -> dict[str, np.ndarray]:
    path = run / "analysis" / "arrays.npz"
    if not path.is_file():
        raise _explain_first(run, f"{run} has no analysis arrays ({path} is missing)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            missing = sorted(set(_REQUIRED) - names)
            if missing:
                raise _explain_first(run, f"{path} lacks {', '.join(missing)}")
            return {name: np.asarray(npz[name]) for name in (*_REQUIRED, *_OPTIONAL)
                    if name in names}
    except WhylookError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise _explain_first(run, f"{path} is corrupt ({exc.__class__.__name__})") from None


def _check(run: Path, exp: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    for name, ndim in _REQUIRED.items():
        if arrays[name].ndim != ndim:
            raise inconsistent(run, f"{name} has {arrays[name].ndim} dimensions, not {ndim}")
    n = arrays["labels"].shape[0]
    t1, _, h, w = arrays["saliency"].shape
    t, k, m = arrays["beta"].shape
    expect = {
        "sample_index": (n,),
        "assignments": (n, h, w),
        "saliency": (t + 1, n, h, w),
        "confidence": (t + 1, n, m),
        "beta_z": (t, k, m),
        "beta_se": (t, k, m),
        "intensity": (t + 1, n, k),
        "mass_share": (n, k),
        "activity": (n, k),
        "active": (n, k),
        "presence": (n, k),
        "class_groups": (n,),
        "confusion": (t + 1, m, m),
        "groups": (t, n),
    }
    if "beta_group_key" in arrays:
        key = arrays["beta_group_key"]
        g = key.shape[0] if key.ndim else -1  # a 0-d key fails the shape check below
        for name, shape in (("beta_group_key", (g, 3)), ("beta_group", (g, k, m)),
                            ("beta_group_z", (g, k, m))):
            if name not in arrays or arrays[name].shape != shape:
                raise inconsistent(run, f"{name} is missing or not of shape {shape}")
        if g and (key[:, 0].min() < 0 or key[:, 0].max() >= t):
            raise inconsistent(run, "beta_group_key names a transition out of range")
    for name, shape in expect.items():
        if name in arrays and arrays[name].shape != shape:
            raise inconsistent(run, f"{name} has shape {arrays[name].shape}, expected {shape}")
    if len(exp["classes"]) != m:
        raise inconsistent(run, f"{len(exp['classes'])} classes named, beta has {m}")
    if len(exp["checkpoints"]) != t1:
        raise inconsistent(run, f"{len(exp['checkpoints'])} checkpoints listed, {t1} in arrays")
    stored_k = exp.get("k", k)
    if not isinstance(stored_k, int) or isinstance(stored_k, bool) or stored_k != k:
        raise inconsistent(run, f"k={exp.get('k')} but beta has {k} prototypes")
    labels, assign = arrays["labels"], arrays["assignments"]
    if n and (labels.min() < 0 or labels.max() >= m):
        raise inconsistent(run, "labels out of range")
    if n and (assign.min() < 0 or assign.max() >= k):
        raise inconsistent(run, "assignments out of range")
    if n == 0 or t1 < 2:
        raise inconsistent(run, "empty analysis set or fewer than two checkpoints")
    if any(not 0 <= e["transition"] < t for e in exp.get("learning_patterns", [])):
        raise inconsistent(run, "learning_patterns names a transition out of range")


def _data_spec(run_json: dict[str, Any], exp: dict[str, Any]) -> Any:
    for candidate in (run_json.get("data"), (run_json.get("config") or {}).get("data"),
                      (exp.get("run") or {}).get("data")):
        if isinstance(candidate, dict) and "spec" in candidate:
            candidate = candidate["spec"]
        if candidate:
            return candidate
    return None


def _load_images(spec: Any, sample_index: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The analysis rows' training images, or ``(None, why not)``.

    A report without pictures still explains something, so a data source that cannot be
    read (moved files, a foreign machine) degrades to a note instead of an error.
    """
    if spec is None:
        return None, "run.json names no data source"
    try:
        from whylook.data import load_data
    except ImportError:  # pragma: no cover - only while data.py is being written
        return None, "whylook.data is not available"
    try:
        source = load_data(spec)
        images = source.train.images
        if len(sample_index) and int(np.max(sample_index)) >= len(images):
            return None, f"the data source {spec} has fewer training samples than the analysis"
        rows = np.asarray(images[np.asarray(sample_index, dtype=np.int64)])
    except WhylookError as exc:
        return None, f"the data source could not be read ({exc})"
    if rows.ndim != 4 or rows.shape[1] not in (1, 3) or rows.dtype != np.uint8:
        return None, f"training images have shape {rows.shape} {rows.dtype}, not (N, C, H, W) uint8"
    return rows, None


def _optional_json(path: Path) -> tuple[Any, str | None]:
    try:
        return _read_json(path), None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        return None, f"{path.name} could not be read ({exc.__class__.__name__})"


def load(run: str | Path) -> Inputs:
    """Read and check a run folder for the report."""
    from whylook._io import require_run_folder

    run = require_run_folder(run)
    run_file = run / "run.json"
    run_json = read_json(run_file, "run file")
    if not isinstance(run_json, dict):
        raise WhylookError(f"{run_file} is not a whylook run.json; it was not written by "
                           "whylook (create the run with 'whylook train' or 'whylook import')")
    exp = _load_explanation(run)
    arrays = _load_arrays(run)
    _check(run, exp, arrays)

    classes = [str(c) for c in exp["classes"]]
    ckpts = exp["checkpoints"]
    try:
        steps = [int(c["step"]) for c in ckpts]
    except (KeyError, TypeError, ValueError):
        raise inconsistent(run, "checkpoints without a step") from None
    # Test loss lives in run.json (per checkpoint index); accuracy in both.
    by_index = {}
    for c in run_json.get("checkpoints") or []:
        if isinstance(c, dict) and "index" in c:
            by_index[c["index"]] = c
    test_acc: list[float | None] = []
    test_loss: list[float | None] = []
    for i, c in enumerate(ckpts):
        rc = by_index.get(c.get("index", i), {})
        acc = c.get("test_accuracy", rc.get("test_accuracy"))
        loss = c.get("test_loss", rc.get("test_loss"))
        test_acc.append(None if acc is None else float(acc))
        test_loss.append(None if loss is None else float(loss))

    images, note = _load_images(_data_spec(run_json, exp), arrays["sample_index"])

    finetune = None
    ft = run / "finetune" / "finetune.json"
    if ft.is_file():
        finetune = _optional_json(ft)
    compare = []
    cdir = run / "compare"
    if cdir.is_dir():
        for path in sorted(cdir.glob("*.json")):
            content, err = _optional_json(path)
            compare.append((path.name, content, err))

    return Inputs(
        run_path=run,
        run=run_json,
        explanation=exp,
        arrays=arrays,
        classes=classes,
        steps=steps,
        test_accuracy=test_acc,
        test_loss=test_loss,
        images=images,
        image_note=note,
        finetune=finetune,
        compare=compare,
    )
