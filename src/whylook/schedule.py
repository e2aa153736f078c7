"""Checkpoint schedules in optimizer steps (docs/METHOD-NOTES.md, Step 0).

Step ``s`` means "after ``s`` optimizer steps": step 0 is the initialisation and
``total_steps`` the final model. Every schedule is sorted, unique and holds both ends.

- ``log`` (default): dense early, where most change happens. Starting from 0 and 1, each
  next step multiplies the previous one by the ratio that still reaches ``total_steps``
  in the remaining checkpoints (at least +1), so exactly ``n`` distinct steps come out.
- ``linear``: evenly spaced.
- ``epoch``: epoch boundaries (``0, spe, 2*spe, ..., total``); ``n`` is then an upper
  bound, and with fewer than epochs+1 checkpoints, evenly spread boundaries are kept.

>>> checkpoint_steps(100, 5)
[0, 1, 5, 22, 100]
>>> checkpoint_steps(100, 5, "linear")
[0, 25, 50, 75, 100]
>>> checkpoint_steps(96, 12, "epoch", steps_per_epoch=32)
[0, 32, 64, 96]
"""

from __future__ import annotations

import numpy as np

from whylook.errors import WhylookError, option

__all__ = ["SCHEDULES", "checkpoint_steps"]

SCHEDULES = ("log", "linear", "epoch")


def checkpoint_steps(
    total_steps: int, n: int, kind: str = "log", steps_per_epoch: int | None = None
) -> list[int]:
    """``n`` checkpoint steps from 0 to ``total_steps`` (see the module docstring).

    ``log``/``linear`` with more checkpoints than distinct steps (``total_steps + 1``) is an
    error, not a silent clamp: the run would not have the checkpoints that were asked for.
    """
    if total_steps < 1:
        raise WhylookError(f"training has {total_steps} optimizer steps; it needs at least 1")
    if n < 2:
        raise WhylookError(
            f"{n} checkpoint(s) requested; at least 2 are needed (initialisation and final)"
        )
    if kind == "epoch":
        return _epoch_steps(total_steps, n, steps_per_epoch)
    if kind not in SCHEDULES:
        raise WhylookError(f"unknown schedule {kind!r}; use one of {', '.join(SCHEDULES)}")
    if n > total_steps + 1:
        raise WhylookError(
            f"{n} checkpoints requested but training has only {total_steps} optimizer steps "
            f"({total_steps + 1} distinct checkpoints); lower {option('checkpoints')} or train "
            "longer"
        )
    if kind == "linear":
        return [int(s) for s in np.rint(np.linspace(0, total_steps, n)).astype(int)]
    return _log_steps(total_steps, n)


def _log_steps(total: int, n: int) -> list[int]:
    steps = [0, 1]
    while len(steps) < n:
        remaining = n - len(steps)  # checkpoints still to place, the last one at `total`
        prev = steps[-1]
        ideal = prev * (total / prev) ** (1.0 / remaining)
        # At least one step later than prev, and leave room for the ones still to come.
        steps.append(min(max(prev + 1, round(ideal)), total - (remaining - 1)))
    if n == 2:
        steps = [0, total]
    return steps


def _epoch_steps(total: int, n: int, steps_per_epoch: int | None) -> list[int]:
    if not steps_per_epoch or steps_per_epoch < 1:
        raise WhylookError("the epoch schedule needs steps_per_epoch >= 1")
    bounds = sorted({*range(0, total, steps_per_epoch), total})
    if n >= len(bounds):
        return bounds
    keep = np.rint(np.linspace(0, len(bounds) - 1, n)).astype(int)
    return [bounds[i] for i in keep]
