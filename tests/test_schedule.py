"""Checkpoint schedules: both ends, sorted, unique, the requested count, log denser early."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whylook.errors import WhylookError
from whylook.schedule import checkpoint_steps


@given(total=st.integers(1, 100_000), data=st.data())
@pytest.mark.parametrize("kind", ["log", "linear"])
def test_exact_count_sorted_unique_with_both_ends(kind: str, total: int, data) -> None:
    n = data.draw(st.integers(2, min(total + 1, 60)))
    steps = checkpoint_steps(total, n, kind)
    assert len(steps) == n
    assert steps[0] == 0
    assert steps[-1] == total
    assert all(b > a for a, b in itertools.pairwise(steps))
    assert all(isinstance(s, int) for s in steps)


def test_log_is_denser_early_than_linear() -> None:
    log = checkpoint_steps(1407, 12, "log")
    linear = checkpoint_steps(1407, 12, "linear")
    half = 1407 // 2
    assert sum(s <= half for s in log) > sum(s <= half for s in linear)
    # Gaps grow along the log schedule: the first gap is the smallest, the last the largest.
    gaps = [b - a for a, b in itertools.pairwise(log)]
    assert gaps[0] == min(gaps)
    assert gaps[-1] == max(gaps)
    assert log[:3] == [0, 1, 2]


def test_known_values() -> None:
    assert checkpoint_steps(100, 5, "log") == [0, 1, 5, 22, 100]
    assert checkpoint_steps(100, 5, "linear") == [0, 25, 50, 75, 100]
    assert checkpoint_steps(3, 4, "log") == [0, 1, 2, 3]
    assert checkpoint_steps(7, 2, "log") == [0, 7]


def test_epoch_schedule_uses_epoch_boundaries() -> None:
    assert checkpoint_steps(96, 12, "epoch", steps_per_epoch=32) == [0, 32, 64, 96]
    # Fewer checkpoints than boundaries: evenly spread boundaries, both ends kept.
    assert checkpoint_steps(320, 3, "epoch", steps_per_epoch=32) == [0, 160, 320]
    # A last partial epoch still ends on the last step.
    assert checkpoint_steps(70, 10, "epoch", steps_per_epoch=32) == [0, 32, 64, 70]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 12, "log"), "only 10 optimizer steps"),
        ((10, 12, "linear"), "only 10 optimizer steps"),
        ((10, 1, "log"), "at least 2"),
        ((0, 2, "log"), "at least 1"),
        ((10, 3, "cosine"), "unknown schedule"),
        ((10, 3, "epoch"), "steps_per_epoch"),
    ],
)
def test_bad_requests_are_clear_errors(args: tuple, message: str) -> None:
    with pytest.raises(WhylookError, match=message):
        checkpoint_steps(*args)
