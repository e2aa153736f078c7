"""Run folders: reading ``run.json`` and checkpoints, and importing foreign checkpoints.

A run folder (the output contract in docs/ARCHITECTURE.md) holds ``run.json`` (schema
``whylook.run/1``) and ``checkpoints/ckpt-NNNN.safetensors``. ``run.json`` is written
last, only when the run is complete; a folder that lacks it is not a run. Its keys:

- ``schema``, ``source`` (``"train"`` or ``"import"``)
- ``config``: ``model``, ``data`` (the data spec), ``data_limit_per_class``, ``layer``,
  ``layer_shape`` (d, h, w), ``num_classes``, ``in_channels``, ``image_size`` (H, W),
  ``mean``/``std`` (the built-in models' normalisation), ``epochs``, ``batch_size``, ``lr``,
  ``optimizer``, ``schedule``, ``checkpoints_requested``, ``steps_per_epoch``,
  ``total_steps``, ``device`` (null where unknown, as for imports)
- ``classes``: class names; ``data``: ``spec``, ``train_size``, ``test_size``, ``digest``
- ``checkpoints``: ``[{index, step, epoch, file, test_accuracy, test_loss}]``; ``epoch`` is
  ``step / steps_per_epoch`` (fractional), null for imported checkpoints
- ``seeds``: ``seed``, ``data_seed``; ``versions``: package versions; ``measured``: timings
  and other figures the run measured; ``imported``: the source files of an import

>>> run = RunFolder.open("runs/a")  # doctest: +SKIP
>>> model = run.load_model(-1)  # the final model, in eval mode  # doctest: +SKIP
>>> len(run.checkpoints), model.training  # doctest: +SKIP
(12, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from whylook import _io
from whylook._checks import is_whole, is_whole_valued
from whylook._io import INCOMPLETE_MARKER, require_run_folder
from whylook.data import DataSource, is_loadable_spec, load_data
from whylook.errors import WhylookError, option
from whylook.models import (
    MODEL_NAMES,
    Normalize,
    build_model,
    default_layer,
    layer_shape,
    model_spec,
    require_trusted_factory,
    resolve_device,
    rng_kept,
)

__all__ = [
    "MIN_CHECKPOINTS",
    "RUN_SCHEMA",
    "CheckpointInfo",
    "RunFolder",
    "import_checkpoints",
    "require_run_folder",
]

RUN_SCHEMA = "whylook.run/1"
CHECKPOINT_DIR = "checkpoints"
#: The fewest checkpoints the analysis takes: two transitions, so that a change can be told
#: from the one before it (train and import refuse fewer before any work).
MIN_CHECKPOINTS = 3
_LOCK_NAME = ".whylook.lock"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a run; ``file`` is relative to the run folder."""

    index: int
    step: int
    epoch: float | None
    file: str
    test_accuracy: float
    test_loss: float


@dataclass(frozen=True, eq=False)
class RunFolder:
    """A complete run folder. Open one with :meth:`RunFolder.open`.

    ``config`` is run.json's ``config``; ``manifest`` is all of run.json.
    """

    path: Path
    config: dict[str, Any]
    classes: tuple[str, ...]
    checkpoints: list[CheckpointInfo]
    layer: str
    manifest: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunFolder:
        """Open and validate a run folder; anything wrong is a one-line WhylookError.

        >>> RunFolder.open("no/such/run")
        Traceback (most recent call last):
        whylook.errors.WhylookError: run folder no/such/run does not exist
        """
        path = require_run_folder(path)
        manifest = _io.read_json(path / "run.json", "run file")
        if not isinstance(manifest, dict) or manifest.get("schema") != RUN_SCHEMA:
            found = manifest.get("schema") if isinstance(manifest, dict) else None
            raise WhylookError(
                f"{path}/run.json has schema {found!r}, not {RUN_SCHEMA!r}; it was not written "
                "by this version of whylook"
            )
        try:
            config = manifest["config"]
            classes = tuple(str(c) for c in manifest["classes"])
            for key, kind in (
                ("model", str),
                ("data", str),
                ("layer", str),
                ("num_classes", int),
                ("in_channels", int),
                ("image_size", list),
            ):
                if not isinstance(config[key], kind):
                    raise TypeError(f"config.{key} is not {kind.__name__}")
            checkpoints = [
                CheckpointInfo(
                    index=int(c["index"]),
                    step=int(c["step"]),
                    epoch=None if c["epoch"] is None else float(c["epoch"]),
                    file=str(c["file"]),
                    test_accuracy=float(c["test_accuracy"]),
                    test_loss=float(c["test_loss"]),
                )
                for c in manifest["checkpoints"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise WhylookError(
                f"{path}/run.json is malformed ({type(exc).__name__}: {exc}); re-create the run"
            ) from None
        if len(classes) != config["num_classes"] or not checkpoints:
            raise WhylookError(
                f"{path}/run.json is malformed (class names or checkpoints do not match the "
                "config); re-create the run"
            )
        limit = config.get("data_limit_per_class")
        if limit is not None and (not is_whole(limit) or limit < 1):
            raise WhylookError(
                f"{path}/run.json is malformed (config.data_limit_per_class is {limit!r}, not a "
                "whole number >= 1 or null); re-create the run"
            )
        steps = [ck.step for ck in checkpoints]
        # The analysis orders and spaces checkpoints by step; import refuses such steps too.
        if steps[0] < 0 or any(b <= a for a, b in itertools.pairwise(steps)):
            raise WhylookError(
                f"{path}/run.json is malformed (checkpoint steps {steps} are not >= 0 and "
                "strictly increasing); re-create the run"
            )
        for i, ck in enumerate(checkpoints):
            parts = Path(ck.file).parts
            if ck.index != i or Path(ck.file).is_absolute() or ".." in parts:
                raise WhylookError(
                    f"{path}/run.json lists checkpoint {ck.file!r} at position {i} with index "
                    f"{ck.index}; checkpoints must be numbered 0.. and lie inside the folder"
                )
            if not (path / ck.file).is_file():
                raise WhylookError(
                    f"checkpoint {path / ck.file} listed in run.json is missing; the run folder "
                    "is damaged, train or import it again"
                )
        return cls(path, config, classes, checkpoints, config["layer"], manifest)

    def data(self) -> DataSource:
        """Load the run's data source (the same data it was trained on, checked by hash)."""
        source = load_data(
            self.config["data"], limit_per_class=self.config.get("data_limit_per_class")
        )
        expected = self.manifest.get("data", {}).get("digest")
        if expected and source.digest != expected:
            raise WhylookError(
                f"the data {self.config['data']} has changed since run {self.path} was "
                "created (content hash differs); point the run at the original data"
            )
        return source

    def build_model(self) -> nn.Module:
        """A fresh, untrained model of the run's architecture (``whylook_layer`` = run.layer)."""
        if ":" in str(self.config["model"]):
            require_trusted_factory(str(self.config["model"]), f"run {self.path}")
        model = build_model(
            self.config["model"],
            num_classes=int(self.config["num_classes"]),
            in_channels=int(self.config["in_channels"]),
            image_size=tuple(self.config["image_size"]),
            mean=self.config.get("mean"),
            std=self.config.get("std"),
        )
        # setattr: torch types nn.Module's attributes as tensors or modules, and this is a str.
        setattr(model, "whylook_layer", self.layer)  # noqa: B010
        return model

    def _holder(self) -> nn.Module:
        # A model only to receive a checkpoint's weights: its random initialisation is
        # overwritten, so it must not draw from (and move) the caller's torch random state.
        with rng_kept():
            return self.build_model()

    def checkpoint_path(self, index: int) -> Path:
        """The safetensors file of checkpoint ``index`` (negative counts from the end)."""
        return self.path / self._checkpoint(index).file

    def state_dict(self, index: int, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The weights of checkpoint ``index``, checked against ``model`` (or a fresh one)."""
        path = self.checkpoint_path(index)
        return fit_state(model or self._holder(), _io.load_weights(path), path)

    def load_model(self, index: int, device: str | torch.device = "cpu") -> nn.Module:
        """The model at checkpoint ``index`` (negative counts from the end), in eval mode."""
        model = self._holder()
        model.load_state_dict(self.state_dict(index, model))
        return model.to(resolve_device(device)).eval()

    def _checkpoint(self, index: int) -> CheckpointInfo:
        try:
            return self.checkpoints[index]
        except (IndexError, TypeError):
            raise WhylookError(
                f"run {self.path} has checkpoints 0..{len(self.checkpoints) - 1}, not {index!r}"
            ) from None


# ----------------------------------------------------------------------------- shared helpers


def fit_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike[str],
) -> dict[str, torch.Tensor]:
    """``state`` made ready for ``model.load_state_dict``, or a one-line error on the first
    missing, unexpected or mismatched key. A prefix on every key (``module.`` from
    DataParallel, ``_orig_mod.`` from torch.compile, ``model.`` from a Lightning module) is
    dropped, and a model that wraps the saved one gets its prefix added in its place; a
    checkpoint of an ``nn.Sequential`` around the model (every key ``1.``...) is refused.
    Weights that are sparse, or not floating point where the model's are, are refused in one
    line too.
    """
    expected = model.state_dict()
    state = _match_prefix(state, expected.keys(), source)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for keys, what in ((missing, "missing key"), (unexpected, "unexpected key")):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            problems.append(f"{what} {keys[0]!r}{more}")
    if mismatched:
        k = mismatched[0]
        more = f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        problems.append(
            f"{k!r} is {_shape(state[k])} in the checkpoint but {_shape(expected[k])} in the "
            f"model{more}"
        )
    if problems:
        raise WhylookError(
            f"checkpoint {source} does not fit the model: {'; '.join(problems)}; check "
            f"{option('model')} and {option('data')} (class count, channels and image size "
            "must match training)"
        )
    for k in expected:
        _check_tensor(state[k], expected[k], k, source)
    return state


def _check_tensor(
    value: torch.Tensor, expected: torch.Tensor, key: str, source: str | os.PathLike[str]
) -> None:
    # load_state_dict would copy_() these into the model: a sparse tensor raises deep inside
    # torch, and integer, bool or complex values are cast without a word (complex loses its
    # imaginary part), which gives an explanation of weights nobody trained.
    if value.layout != torch.strided:
        raise WhylookError(
            f"checkpoint {source} holds {key!r} as a sparse tensor ({value.layout}); save the "
            "weights dense (tensor.to_dense()) and import that file"
        )
    if value.is_complex() or (expected.is_floating_point() and not value.is_floating_point()):
        raise WhylookError(
            f"checkpoint {source} holds {key!r} as {str(value.dtype).removeprefix('torch.')}, "
            "not floating point; save the weights as trained (a float model.state_dict(), not "
            "a cast or quantised copy)"
        )


def _match_prefix(state: Mapping[str, torch.Tensor], expected: Iterable[str],
                  source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Drop the leading name components that wrappers put on every key, one at a time,
    while every key shares the same first component, until some key is one of the model's;
    or, when the model wraps the saved network (``nn.Sequential(Normalize(...), net)``),
    swap the dropped components for the one of the model's that makes every key its own
    (``model.conv1.weight`` -> ``1.conv1.weight``).

    A dropped all-digit component is an index of an ``nn.Sequential`` the checkpoint was
    saved from: a match that needs one is refused, since whatever that Sequential held
    without weights (input normalisation) would be lost without a sign."""
    want = set(expected)
    if not state or want & state.keys():
        return dict(state)
    heads = sorted({k.split(".", 1)[0] for k in want if "." in k})
    dropped: list[str] = []
    keys = dict(state)
    while True:
        found = keys if want & keys.keys() else None
        if found is None:
            head = next((h for h in heads if {f"{h}.{k}" for k in keys} <= want), None)
            if head is not None:
                found = {f"{head}.{k}": v for k, v in keys.items()}
        if found is not None:
            # Index 0 has nothing in front of the network (nn.Sequential(net, nn.Softmax(1))).
            if any(part.isdigit() and part != "0" for part in dropped):
                prefix = "".join(f"{part}." for part in dropped)
                raise WhylookError(
                    f"checkpoint {source} looks saved from a model wrapped in nn.Sequential "
                    f"(every key starts with {prefix!r}), e.g. with input normalisation in "
                    "front, which this model would drop; give the same wrapper as "
                    f"{option('model')}, a factory that returns e.g. "
                    "nn.Sequential(Normalize(mean, std), net)"
                )
            return found
        firsts = {k.split(".", 1)[0] for k in keys}
        if len(firsts) != 1 or not all("." in k for k in keys):
            # Only a change that reaches the model's names counts; otherwise report the
            # keys as given.
            return dict(state)
        dropped.append(firsts.pop())
        keys = {k.split(".", 1)[1]: v for k, v in keys.items()}


def _check_name_order(paths: Sequence[Path]) -> None:
    """Refuse files whose names are one pattern numbered out of order (``epoch_0.pt``,
    ``epoch_10.pt``, ``epoch_2.pt``: a shell glob sorts digits as text).

    Taken as given they would be analysed in that order: the "final" model would be one
    from the middle of training, and nothing downstream could tell. Names that share a
    pattern are in order when their numbers, read in some order of significance, increase:
    the training counter may come after a metric, or a date after the time of day (the
    counter may span two numbers: epoch, then batch). They are refused when not (``ls -v``
    gives an order that passes); a name of its own pattern (``init.pt``) has no order to
    check.

    >>> _check_name_order([Path("e_0.pt"), Path("e_10.pt"), Path("e_2.pt")])
    Traceback (most recent call last):
    whylook.errors.WhylookError: the checkpoint files are not in the order of the numbers ...
    >>> _check_name_order([Path("init.pt"), Path("e_10.pt"), Path("e_2.pt")])
    Traceback (most recent call last):
    whylook.errors.WhylookError: ... (e_10.pt, e_2.pt; a shell glob sorts 10 before 2); ...
    >>> _check_name_order([Path("init.pt"), Path("e_2.pt"), Path("e_10.pt")])
    >>> _check_name_order([Path(f"checkpoint-{n}/model.bin") for n in (500, 1000, 1500)])
    >>> _check_name_order([Path("acc0.91_step100.pt"), Path("acc0.95_step200.pt"),
    ...                    Path("acc0.93_step300.pt")])
    >>> _check_name_order([Path("23h10_2024-01-31.pt"), Path("08h05_2024-02-01.pt"),
    ...                    Path("14h30_2024-02-01.pt")])
    """
    # The whole path: a trainer may number the folders and name every file alike
    # (checkpoint-500/pytorch_model.bin).
    names = [p.as_posix() for p in paths]
    if len(set(names)) != len(names):
        return  # a file given twice gets its own message from the check of the weights
    patterns: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        patterns.setdefault(re.sub(r"\d+", "#", name), []).append(i)
    for members in patterns.values():
        numbers = [tuple(int(d) for d in re.findall(r"\d+", names[i])) for i in members]
        if len(members) < 2 or not numbers[0] or _increasing(numbers):
            continue
        short = [paths[i].name for i in members]
        if len(set(short)) != len(short):
            short = [f"{paths[i].parent.name}/{paths[i].name}" for i in members]
        shown = ", ".join(short[:4]) + (", ..." if len(short) > 4 else "")
        raise WhylookError(
            f"the checkpoint files are not in the order of the numbers in their names ({shown}; "
            "a shell glob sorts 10 before 2); give them in training order (e.g. `ls -v`, or "
            f"names padded with zeros), or confirm this order with {option('steps')}"
        )


def _increasing(numbers: Sequence[tuple[int, ...]]) -> bool:
    """Whether some order of significance of the positions makes ``numbers`` strictly
    increasing: a position that never decreases where the more significant ones tie is
    taken next (taking it never hurts), until every neighbour pair is told apart.

    >>> _increasing([(91, 100), (95, 200), (93, 300)]), _increasing([(0,), (10,), (2,)])
    (True, False)
    """
    pairs = list(itertools.pairwise(numbers))
    untold = set(range(len(pairs)))
    positions = set(range(len(numbers[0]) if numbers else 0))
    while untold:
        usable = next((j for j in sorted(positions)
                       if all(pairs[i][0][j] <= pairs[i][1][j] for i in untold)), None)
        if usable is None:
            return False
        positions.discard(usable)
        untold = {i for i in untold if pairs[i][0][usable] == pairs[i][1][usable]}
    return True


def _normalize_keys(model: nn.Module) -> list[str]:
    return [
        f"{name}.{buf}" if name else buf
        for name, module in model.named_modules()
        if isinstance(module, Normalize)
        for buf in ("mean", "std")
    ]


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def as_source(data: str | DataSource) -> DataSource:
    """A DataSource from a spec, or a given DataSource whose spec can be reloaded later."""
    if isinstance(data, DataSource):
        if not is_loadable_spec(data.spec):
            raise WhylookError(
                f"DataSource spec {data.spec!r} cannot be loaded again, so the run could not "
                "find its data; save the arrays with numpy.savez and use npz:PATH"
            )
        return data
    return load_data(data)


def resolve_layer(
    model: nn.Module, layer: str | None, input_shape: Sequence[int]
) -> tuple[str, tuple[int, int, int]]:
    """The prototype layer to record (``layer`` or the model's default) and its (d, h, w)."""
    name = layer or default_layer(model, input_shape)
    return name, layer_shape(model, name, input_shape)


def model_config(
    model_name: str, source: DataSource, layer: str, shape: tuple[int, int, int]
) -> dict[str, Any]:
    """The part of ``config`` that rebuilds the model and names its data and layer."""
    builtin = model_name in MODEL_NAMES
    mean, std = source.channel_stats() if builtin else (None, None)
    return {
        "model": model_name,
        "data": source.spec,
        "data_limit_per_class": source.limit_per_class,
        "layer": layer,
        "layer_shape": list(shape),
        "num_classes": source.num_classes,
        "in_channels": source.channels,
        "image_size": list(source.image_size),
        "mean": list(mean) if mean else None,
        "std": list(std) if std else None,
    }


def data_info(source: DataSource) -> dict[str, Any]:
    return {
        "spec": source.spec,
        "train_size": len(source.train),
        "test_size": len(source.test),
        "digest": source.digest,
    }


def package_versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    import whylook

    return {
        "whylook": whylook.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
    }


def checkpoint_file(index: int) -> str:
    return f"{CHECKPOINT_DIR}/ckpt-{index:04d}.safetensors"


def prepare_out(out: str | os.PathLike[str]) -> Path:
    """Check that ``out`` can become a new run folder, before anything is written."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise WhylookError(
                f"{option('out')} {out} exists and is not a folder; choose another path"
            )
        if (out / "run.json").exists():
            raise WhylookError(
                f"{option('out')} {out} already holds a run; choose a new one or delete that folder"
            )
        # A lone lock file is ours: a command killed between taking the lock and marking
        # the folder incomplete leaves it behind (see creating_run).
        leftovers = {p.name for p in out.iterdir()} - {_LOCK_NAME}
        if leftovers and INCOMPLETE_MARKER not in leftovers:
            raise WhylookError(
                f"{option('out')} {out} exists and is not empty; choose a new folder for the run"
            )
    # The nearest existing folder is where the run folder will be created: a file there, or
    # a folder this process cannot write, would only fail after the data and the model are
    # loaded (and, for train, after training), with an OSError from deep inside pathlib.
    nearest = out
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise _cannot_create(out, f"{nearest} is a file")
    if not os.access(nearest, os.W_OK):
        raise _cannot_create(out, f"{nearest} is not writable")
    return out


def _cannot_create(out: Path, why: str) -> WhylookError:
    return WhylookError(
        f"cannot create the run folder {out} ({why}); choose a folder you can write with --out"
    )


@contextlib.contextmanager
def creating_run(out: Path) -> Iterator[Path]:
    """Create run folder ``out`` under its lock; on any failure, take it away again.

    While the body runs the folder holds an incompleteness marker, so a run killed with
    SIGKILL is recognisable (and may be overwritten by the next attempt).
    """
    existed = out.exists()
    with contextlib.ExitStack() as lock:
        try:
            lock.enter_context(_io.run_lock(out))
        except OSError as exc:
            # What prepare_out cannot see: /proc, a read-only mount, root's access rights.
            if not existed:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if empty: never what another process put there
            raise _cannot_create(out, f"{exc.__class__.__name__}: {exc.strerror}") from None
        try:
            # Mark the folder before clearing the leftovers of a killed attempt (see
            # prepare_out): a kill while clearing must still leave a folder marked as ours.
            (out / INCOMPLETE_MARKER).write_text(
                "whylook is writing this run folder, or was stopped while doing so\n"
            )
            _clear(out, keep={_LOCK_NAME, INCOMPLETE_MARKER})
            yield out
            (out / INCOMPLETE_MARKER).unlink()
        except BaseException:
            if existed:
                _clear(out)
            else:
                shutil.rmtree(out, ignore_errors=True)
            raise


def _clear(folder: Path, keep: Set[str] = frozenset()) -> None:
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ----------------------------------------------------------------------------- import


def import_checkpoints(
    files: Sequence[str | os.PathLike[str]],
    *,
    data: str | DataSource,
    model: str | Callable[..., nn.Module],
    steps: Iterable[float] | None = None,
    layer: str | None = None,
    device: str = "auto",
    out: str | os.PathLike[str],
    progress: bool | None = None,
) -> RunFolder:
    """Bring checkpoints trained elsewhere (in training order) into a new run folder.

    Each file (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with
    ``weights_only=True``; a wrapped state dict and a prefix on every key are understood)
    must fit ``model`` built for ``data`` and hold finite floating-point weights, each file
    different weights; all are checked, and evaluated on the test split, before anything is
    written.
    They are stored as safetensors. ``steps`` (optimizer step of each checkpoint, whole
    numbers; ``100.0`` counts) default to 0, 1, 2, ...; epochs are unknown and recorded as
    null.
    Missing ``normalize.mean/std`` buffers of a built-in model are filled with the training
    split's statistics (recorded per file as ``normalize_filled``).

    >>> run = import_checkpoints(["a.pt", "b.pt"], data="mnist5k", model="smallcnn",
    ...                          out="runs/imported")  # doctest: +SKIP
    """
    from whylook._progress import progress_bar
    from whylook.train import evaluate

    if isinstance(files, str | os.PathLike):
        raise WhylookError(
            f"files must be a list of checkpoint files in training order (at least "
            f"{MIN_CHECKPOINTS}), not "
            f"the one path {str(files)!r:.80}; pass [first, ..., last]"
        )
    model = model_spec(model)
    paths = [Path(f).expanduser() for f in files]
    if len(paths) < MIN_CHECKPOINTS:
        raise WhylookError(
            f"{len(paths)} checkpoint(s) given; the analysis needs at least {MIN_CHECKPOINTS} "
            "(e.g. the initialisation, one from training and the final model)"
        )
    if steps is None:
        _check_name_order(paths)
        steps = range(len(paths))
    # Read once: a generator checked here would give the run nothing afterwards. An array's
    # or tensor's elements are 0-d arrays, not numbers (a 0-d one is a number, refused).
    given = (None if isinstance(steps, str) or not isinstance(steps, Iterable)
             or (isinstance(steps, np.ndarray | torch.Tensor) and steps.ndim == 0)
             else [_as_number(s) for s in steps])
    if given is None or not all(is_whole_valued(s) for s in given):
        raise WhylookError(
            "steps must be a list of whole numbers, one per checkpoint, not "
            f"{steps if given is None else given!r:.80}"
        )
    at = [int(s) for s in given]
    if len(at) != len(paths):
        raise WhylookError(f"{len(paths)} checkpoints but {len(at)} steps; give one each")
    if at[0] < 0 or any(b <= a for a, b in itertools.pairwise(at)):
        raise WhylookError(f"steps {at} must be >= 0 and strictly increasing")
    out = prepare_out(out)
    dev = resolve_device(device)
    source = as_source(data)
    with rng_kept():  # only to check the files: see RunFolder._holder
        net = build_for(model, source)
    name, shape = resolve_layer(net, layer, (source.channels, *source.image_size))
    config = model_config(model, source, name, shape)
    keys = net.state_dict().keys()
    # Taken before any checkpoint is loaded into net: filling from net itself would give a
    # file that lacks them the buffers of whichever file was loaded before it.
    fill = {k: net.state_dict()[k].clone() for k in _normalize_keys(net)}

    def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The file's own weights (prefixes stripped) and those weights fitted to net."""
        own = _match_prefix(_io.load_weights(path), keys, path)
        return own, fit_state(net, {**fill, **own}, path)

    digests: dict[str, Path] = {}
    for path in paths:  # check every file before anything is written
        _, state = read(path)
        _check_finite(state, path)
        net.load_state_dict(state)
        digest = _weights_digest(net.state_dict())
        if digest in digests:
            # Two equal checkpoints make a step in which nothing was learned: every
            # confidence change, and so every z of the explanation, would be 0.
            same = (f"checkpoint {path} is given twice" if digests[digest] == path
                    else f"checkpoints {digests[digest]} and {path} hold the same weights")
            raise WhylookError(f"{same}; give each checkpoint of the training once")
        digests[digest] = path
    records, imported = [], []
    # Evaluated before the run folder is created too: a model whose outputs overflow has no
    # test loss that run.json could hold.
    for i, path in enumerate(progress_bar(paths, desc="import", progress=progress)):
        own, state = read(path)
        net.load_state_dict(state)
        accuracy, loss = evaluate(net.to(dev), source.test, device=dev)
        if not math.isfinite(loss):
            raise WhylookError(
                f"checkpoint {path}: the model returned NaN or infinite logits (test loss "
                f"{loss}); check the weights for a diverged training and import only the "
                "checkpoints from before it"
            )
        records.append(checkpoint_record(i, at[i], None, accuracy, loss))
        imported.append(
            {
                "file": str(path.resolve()),
                "sha256": _io.file_digest(path),
                "normalize_filled": any(k not in own for k in fill),
            }
        )
    with creating_run(out):
        for i, path in enumerate(paths):
            net.load_state_dict(read(path)[1])
            _io.save_weights(out / checkpoint_file(i), net.state_dict())
        config.update(
            epochs=None,
            batch_size=None,
            lr=None,
            optimizer=None,
            schedule="imported",
            checkpoints_requested=len(paths),
            steps_per_epoch=None,
            total_steps=at[-1],
            device=str(dev),
        )
        write_manifest(
            out,
            source="import",
            config=config,
            source_data=source,
            checkpoints=records,
            seeds={"seed": None, "data_seed": None},
            measured={},
            extra={"imported": imported},
        )
    return RunFolder.open(out)


def _as_number(value: object) -> Any:
    if isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 0:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # a meta tensor
            return value.item()
    return value


def _check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WhylookError(
                f"checkpoint {source} holds NaN or infinite weights in {key!r} (a diverged "
                "training); import only the checkpoints from before it diverged"
            )


def _weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of the weights as the model holds them (file format and prefixes aside)."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_for(model: str, source: DataSource) -> nn.Module:
    """A fresh ``model`` shaped for ``source`` (built-in models normalise with its stats)."""
    mean, std = source.channel_stats() if model in MODEL_NAMES else (None, None)
    return build_model(
        model,
        num_classes=source.num_classes,
        in_channels=source.channels,
        image_size=source.image_size,
        mean=mean,
        std=std,
    )


def checkpoint_record(
    index: int, step: int, epoch: float | None, accuracy: float, loss: float
) -> dict[str, Any]:
    """One entry of run.json's ``checkpoints``."""
    return {
        "index": index,
        "step": step,
        "epoch": epoch,
        "file": checkpoint_file(index),
        "test_accuracy": accuracy,
        "test_loss": loss,
    }


def write_manifest(
    out: Path,
    *,
    source: str,
    config: dict[str, Any],
    source_data: DataSource,
    checkpoints: list[dict[str, Any]],
    seeds: dict[str, int | None],
    measured: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write run.json (atomically): the last file of a run, written when it is complete."""
    manifest = {
        "schema": RUN_SCHEMA,
        "source": source,
        "config": config,
        "classes": list(source_data.classes),
        "data": data_info(source_data),
        "checkpoints": checkpoints,
        "seeds": seeds,
        "versions": package_versions(),
        "measured": measured,
        **(extra or {}),
    }
    _io.write_json(out / "run.json", manifest)
