"""Small pages for numpy's large arrays while whylook works (``explain``, the CLI's
commands, the prototype stage's K-Means).

On Linux with transparent huge pages in ``madvise`` mode (the default of many
distributions), numpy asks for huge pages on every array of 4 MiB or more. The first touch
of such a region may make the kernel compact memory on the spot, and on a machine whose
memory is fragmented (by the page cache of the data and checkpoints just read) that costs
system time: K-Means of the analysis benchmark's run (98,000 vectors, K = 32) spent 0.6 to
1.4 s of system CPU per explain against 0.4 s of its own work, and 0.03 s with small pages,
its user time unchanged (``benchmarks/RESULTS.md``, "Huge pages for K-Means"). The advice
is off for all of ``explain``, not the fit alone: the heap keeps the advice of arrays made
before the fit, and off around the fit alone two of three explains still stalled there.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Callable, Iterator


@functools.cache
def setter() -> Callable[[bool], bool] | None:
    """numpy's switch of its huge-page advice (returns the setting before), or None."""
    # Private to numpy (no public switch exists; NUMPY_MADVISE_HUGEPAGE is read only at
    # import); without it the stage runs as numpy chooses.
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found = getattr(module, "_set_madvise_hugepage", None)
        if callable(found):
            return found
    return None


_LOCK = threading.Lock()
_users = 0
_before = True


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """numpy's huge-page advice off inside the block, as before it after the last of any
    concurrent blocks ends (the setting is the process's)."""
    global _users, _before
    switch = setter()  # on first use: the CLI imports this module before numpy
    if switch is None:
        yield
        return
    with _LOCK:
        if _users == 0:
            _before = switch(False)
        _users += 1
    try:
        yield
    finally:
        with _LOCK:
            _users -= 1
            if _users == 0:
                switch(_before)
