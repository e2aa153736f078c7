"""How whylook's processes get memory: small pages for numpy's large arrays while it
works (``explain``, the CLI's commands, the prototype stage's K-Means), and, in the
``whylook`` program only, freed memory kept for reuse (:func:`keep_freed_memory`).

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


#: glibc's mallopt parameters (malloc.h) and the values the ``whylook`` program sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = ((_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20), (_M_MMAP_THRESHOLD, 32 << 20))


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory in the process for the next allocation; True if set.

    By default glibc gives blocks of more than a few MiB back to the kernel when they are
    freed, so every training step faults its activations' pages in again: on a 2-core Xeon
    VM ``whylook train`` (mnist5k, 3 epochs) took 7.4-7.6 s with freed memory kept against
    7.9-8.3 s (page faults 0.14 M against 0.7-0.9 M), for about 100 MiB more peak memory;
    ``explain`` ran the same either way (``benchmarks/RESULTS.md``, "Allocator"). Process-
    wide and for good, so only the ``whylook`` program sets it, not the library.
    """
    import ctypes
    import os

    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system
        glibc = False
    if not glibc:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _KEEP)
