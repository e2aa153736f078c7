"""Threads for the independent fits: results in order, errors raised, warning filters kept."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from whylook._parallel import thread_map
from whylook.errors import WhylookError
from whylook.patterns import find_patterns


def test_results_in_order_and_the_first_error_raised() -> None:
    assert thread_map(lambda x: x * x, range(7), n_jobs=3) == [0, 1, 4, 9, 16, 25, 36]

    def fail_on_two(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    with pytest.raises(ValueError, match="two"):
        thread_map(fail_on_two, range(5), n_jobs=2)
    with pytest.raises(WhylookError, match="n_jobs must be"):
        thread_map(abs, [1, 2], n_jobs=0)


def test_workers_interleaving_catch_warnings_leave_the_callers_filters() -> None:
    """Worker 0 enters catch_warnings, worker 1 enters, worker 0 leaves, worker 1 leaves:
    the list worker 1 puts back is worker 0's temporary one. On Python before 3.14 that
    list became the process's filters (scikit-learn's Parallel does this in every task)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def worker(i: int) -> int:
        if i == 0:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="left behind by worker 0")
                a_in.set()
                assert b_in.wait(10)
            a_out.set()
        else:
            assert a_in.wait(10)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="left behind by worker 1")
                b_in.set()
                assert a_out.wait(10)
        return i

    before = list(warnings.filters)
    assert thread_map(worker, [0, 1], n_jobs=2) == [0, 1]
    assert warnings.filters == before


def test_threaded_patterns_leave_the_callers_filters() -> None:
    rng = np.random.default_rng(0)
    n, m = 300, 4
    conf = rng.dirichlet(np.ones(m), size=(4, n)).astype(np.float32)
    labels = rng.integers(0, m, n)
    before = list(warnings.filters)
    for _ in range(3):
        find_patterns(conf, labels, n_jobs=2)
    assert warnings.filters == before
