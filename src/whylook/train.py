"""Training with checkpoints (docs/METHOD-NOTES.md, Step 0) into a new run folder.

Two seeds, kept apart: ``seed`` draws the initial weights (and any dropout), ``data_seed``
the order of the training data (a fresh permutation every epoch). Adam, cross-entropy,
the last partial batch kept. Checkpoints are taken after the optimizer steps of the
schedule (:mod:`whylook.schedule`), step 0 being the initialisation; each is evaluated on
the whole test split. On CPU, the same seeds give bit-identical checkpoints.

Everything is validated before the run folder is created; if training fails or is
interrupted, the folder is removed again, and ``run.json`` is written last.

>>> run = train("mnist5k", "smallcnn", epochs=1, checkpoints=4, out="runs/quick")  # doctest: +SKIP
>>> [c.step for c in run.checkpoints]  # doctest: +SKIP
[0, 1, 6, 32]
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from whylook import _io
from whylook._checks import is_number, is_whole
from whylook._progress import progress_bar
from whylook.data import DataSource, Split, to_tensor
from whylook.errors import WhylookError, option
from whylook.models import check_trainable, model_spec, resolve_device, rng_kept
from whylook.run import (
    MIN_CHECKPOINTS,
    RunFolder,
    as_source,
    build_for,
    checkpoint_record,
    creating_run,
    model_config,
    prepare_out,
    resolve_layer,
    write_manifest,
)
from whylook.schedule import SCHEDULES, checkpoint_steps

__all__ = ["DEFAULT_LR", "evaluate", "train"]

#: Adam's learning rate when none is given: it trains every built-in model well from scratch.
DEFAULT_LR = 1e-3


def check_lr(lr: object) -> None:
    """Refuse a learning rate that is not a positive finite number (``None``: the default).

    An lr of 0 would train nothing and NaN would fill the weights with NaN, both silently.
    """
    if lr is None:
        return
    ok = is_number(lr) and math.isfinite(lr) and float(lr) > 0
    if not ok:
        raise WhylookError(f"lr must be a positive number, not {lr!r}")


#: Seeds must fit 32 bits: torch's generators refuse what does not fit 64 (with a bare
#: "Overflow"), and 0..2**32-1 is the range NumPy's legacy seeding and most tools share.
MAX_SEED = 2**32 - 1


def check_seed(name: str, seed: object) -> int:
    """``seed`` as an int, or a one-line error when it is not a whole number in 0..2**32-1."""
    if not (is_whole(seed) and 0 <= int(seed) <= MAX_SEED):
        raise WhylookError(f"{name} must be a whole number in 0..{MAX_SEED}, not {seed!r}")
    return int(seed)


def train(
    data: str | DataSource,
    model: str | Callable[..., nn.Module] = "smallcnn",
    *,
    epochs: int = 3,
    checkpoints: int = 12,
    schedule: str = "log",
    seed: int = 0,
    data_seed: int | None = None,
    batch_size: int = 128,
    lr: float | None = None,
    layer: str | None = None,
    device: str = "auto",
    out: str | os.PathLike[str],
    progress: bool | None = None,
) -> RunFolder:
    """Train ``model`` on ``data``, saving ``checkpoints`` checkpoints into run folder ``out``.

    ``layer`` is recorded as the run's prototype layer (default: the model's own).
    ``data_seed`` defaults to ``seed``. The caller's torch RNG state is left untouched.

    >>> run = train("mnist5k", epochs=2, checkpoints=3, out="runs/tiny")  # doctest: +SKIP
    >>> [c.step for c in run.checkpoints], run.checkpoints[-1].test_accuracy > 0.85
    ... # doctest: +SKIP
    ([0, 1, 64], True)
    """
    model = model_spec(model)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not is_whole(value) or value < 1:
            raise WhylookError(f"{name} must be a whole number >= 1, not {value!r}")
    if not is_whole(checkpoints):
        raise WhylookError(
            f"checkpoints must be a whole number >= {MIN_CHECKPOINTS}, not {checkpoints!r}"
        )
    if checkpoints < MIN_CHECKPOINTS:
        raise WhylookError(
            f"{option('checkpoints')} {checkpoints}: the analysis needs at least "
            f"{MIN_CHECKPOINTS} checkpoints (the initialisation, one from training, the "
            f"final); ask for {MIN_CHECKPOINTS} or more"
        )
    # NumPy integers pass the checks; run.json's JSON takes Python's only.
    epochs, batch_size, checkpoints = int(epochs), int(batch_size), int(checkpoints)
    check_lr(lr)
    seed = check_seed("seed", seed)
    data_seed = seed if data_seed is None else check_seed("data_seed", data_seed)
    if not isinstance(out, str | os.PathLike):
        raise WhylookError(
            f"out must be the path of the run folder to create (a str or os.PathLike), "
            f"not {out!r:.80}"
        )
    if schedule not in SCHEDULES:
        raise WhylookError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    lr = DEFAULT_LR if lr is None else float(lr)
    out = prepare_out(out)
    dev = resolve_device(device)
    source = as_source(data)
    steps_per_epoch = math.ceil(len(source.train) / batch_size)
    total_steps = epochs * steps_per_epoch
    steps = checkpoint_steps(total_steps, checkpoints, schedule, steps_per_epoch)
    if len(steps) < MIN_CHECKPOINTS:
        # The epoch schedule gives one checkpoint per epoch and the initialisation,
        # whatever number was asked for.
        raise WhylookError(
            f"the {schedule} schedule gives {len(steps)} checkpoints over {epochs} epoch(s); "
            f"the analysis needs at least {MIN_CHECKPOINTS}: train for more epochs or use the "
            "log or linear schedule"
        )

    # A caller's no_grad or inference_mode would leave nothing to train (or weights that no
    # backward can go through); training always runs with gradients.
    with torch.inference_mode(False), torch.enable_grad(), \
            rng_kept(dev):
        torch.manual_seed(seed)
        net = build_for(model, source)
        check_trainable(net, model)
        layer_name, shape = resolve_layer(net, layer, (source.channels, *source.image_size))
        config = model_config(model, source, layer_name, shape)
        config.update(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer="adam",
            schedule=schedule,
            checkpoints_requested=checkpoints,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            device=str(dev),
        )
        with creating_run(out):
            records, measured = _fit(
                net,
                source,
                steps,
                steps_per_epoch,
                data_seed,
                batch_size,
                lr,
                dev,
                out,
                progress,
            )
            write_manifest(
                out,
                source="train",
                config=config,
                source_data=source,
                checkpoints=records,
                seeds={"seed": seed, "data_seed": data_seed},
                measured=measured,
            )
    return RunFolder.open(out)


def _fit(
    net: nn.Module,
    source: DataSource,
    steps: list[int],
    steps_per_epoch: int,
    data_seed: int,
    batch_size: int,
    lr: float,
    dev: torch.device,
    out: os.PathLike[str],
    progress: bool | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training loop: returns the checkpoint records and the measured figures."""
    images, labels = source.train.images, torch.from_numpy(source.train.labels.copy())
    net.to(dev).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(data_seed)
    save_at = set(steps)
    records: list[dict[str, Any]] = []
    steps_clock, checkpoint_clock = _Stopwatch(dev), _Stopwatch(dev)
    epoch_seconds: list[float] = []
    epoch_cpu: list[float] = []
    marks = (0.0, 0.0)  # the steps clock at the end of the previous epoch

    def save(step: int) -> None:
        with checkpoint_clock:
            index = len(records)
            record = checkpoint_record(index, step, round(step / steps_per_epoch, 6), 0.0, 0.0)
            _io.save_weights(os.path.join(out, record["file"]), net.state_dict())
            record["test_accuracy"], record["test_loss"] = evaluate(net, source.test, device=dev)
        if not math.isfinite(record["test_loss"]):
            raise WhylookError(
                f"training diverged (test loss is not finite at step {step}); lower {option('lr')}"
            )
        records.append(record)

    save(0)
    total = steps[-1]
    for step in progress_bar(range(total), desc="train", total=total, progress=progress):
        batch = step % steps_per_epoch
        epoch_end = batch == steps_per_epoch - 1  # the last step always ends an epoch
        with steps_clock:
            if batch == 0:
                perm = torch.randperm(len(labels), generator=order).numpy()
            idx = perm[batch * batch_size : (batch + 1) * batch_size]
            x = to_tensor(images[idx]).to(dev, non_blocking=True)
            y = labels[idx].to(dev, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            # Count queued GPU work in the steps' time before the clocks are read.
            steps_clock.sync = epoch_end or step + 1 in save_at
        if step + 1 in save_at:
            save(step + 1)
        if epoch_end:
            epoch_seconds.append(round(steps_clock.wall - marks[0], 3))
            epoch_cpu.append(round(steps_clock.cpu - marks[1], 3))
            marks = (steps_clock.wall, steps_clock.cpu)
    measured = {
        "seconds_per_epoch": epoch_seconds,
        "train_seconds": round(sum(epoch_seconds), 3),
        "checkpoint_seconds": round(checkpoint_clock.wall, 3),
        "cpu_seconds_per_epoch": epoch_cpu,
        "final_test_accuracy": records[-1]["test_accuracy"],
        "device_name": _device_name(dev),
        "torch_threads": torch.get_num_threads(),
    }
    return records, measured


def evaluate(
    model: nn.Module,
    split: Split,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 500,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split`` (eval mode, no grad).

    The model's train/eval mode is restored afterwards.

    >>> from whylook.data import load_data
    >>> from whylook.models import build_model
    >>> ds = load_data("mnist5k", limit_per_class=5)
    >>> m = build_model("smallcnn", num_classes=10, in_channels=1, image_size=28)
    >>> acc, loss = evaluate(m, ds.test)
    >>> 0.0 <= acc <= 1.0
    True
    """
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    labels = torch.from_numpy(split.labels.copy())
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                x = to_tensor(split.images[start : start + batch_size]).to(dev)
                y = labels[start : start + batch_size].to(dev)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = max(len(split), 1)
    return correct / n, loss_sum / n


class _Stopwatch:
    """Accumulated wall and CPU seconds (all threads) of the ``with`` blocks it times.

    CPU seconds are kept because on a shared machine the wall time measures the
    neighbours too. Set ``sync`` inside a block to wait for queued CUDA work before its end.
    """

    def __init__(self, device: torch.device) -> None:
        self.wall = self.cpu = 0.0
        self.sync = True
        self._cuda = device.type == "cuda"
        self._start = (0.0, 0.0)

    def __enter__(self) -> _Stopwatch:
        self.sync = True
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda and self.sync:
            torch.cuda.synchronize()
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"
