"""Run independent pieces of an analysis stage on a few threads.

The clustering and ridge stages are many independent fits (one per transition, group and
class) whose heavy parts run in numpy, BLAS and scikit-learn's compiled code, which
release the GIL. Threads, not processes: the inputs are shared without copying, and
results come back in order, so a stage's output does not depend on ``n_jobs``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from whylook._checks import is_whole
from whylook.errors import WhylookError

__all__ = ["check_n_jobs", "thread_map"]

T = TypeVar("T")
R = TypeVar("R")


def check_n_jobs(n_jobs: int | None) -> int:
    """Workers for ``n_jobs``: ``None`` or 1 is serial, ``-1`` one per CPU core.

    >>> check_n_jobs(None), check_n_jobs(3)
    (1, 3)
    """
    if n_jobs is None:
        return 1
    if not is_whole(n_jobs) or n_jobs == 0 or n_jobs < -1:
        raise WhylookError(f"n_jobs must be a positive integer, -1 or None, not {n_jobs!r}")
    return (os.cpu_count() or 1) if n_jobs == -1 else n_jobs


def thread_map(fn: Callable[[T], R], items: Iterable[T], n_jobs: int | None) -> list[R]:
    """``[fn(x) for x in items]``, on ``n_jobs`` threads; the first error is raised.

    The caller's warning filters are the same afterwards. Before Python 3.14 they are one
    list for the whole process, and ``warnings.catch_warnings`` in a worker (scikit-learn
    enters one around every task of its ``Parallel``, even a serial one) saves and puts
    back that list: when two workers interleave, one puts back the other's temporary
    filters, and the process kept them (every threaded explain left an "ignore
    RuntimeWarning" behind). So ``fn`` must not rely on a ``catch_warnings`` of its own
    either; set filters around the call instead.

    >>> thread_map(abs, [-1, 2, -3], n_jobs=2)
    [1, 2, 3]
    """
    workers = check_n_jobs(n_jobs)
    work = list(items)
    if workers == 1 or len(work) < 2:
        return [fn(x) for x in work]
    # One catch_warnings in this thread, around every worker: whatever the workers'
    # interleaved ones leave as the process's filters is replaced by the caller's on exit.
    with warnings.catch_warnings(), ThreadPoolExecutor(
            max_workers=min(workers, len(work))) as pool:
        return list(pool.map(fn, work))
