"""numpy's huge-page advice is off while whylook works and comes back after; the program,
not the library, keeps freed memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from whylook import _memory
from whylook.errors import WhylookError
from whylook.prototypes import PrototypeFinder

needs_switch = pytest.mark.skipif(_memory.setter() is None,
                                  reason="this numpy has no switch for its huge-page advice")


def _advice() -> bool:
    switch = _memory.setter()
    assert switch is not None
    before = switch(True)
    switch(before)
    return before


@pytest.fixture(params=[True, False])
def advice(request):
    """Each test under either setting of the process, which it must leave as it was."""
    switch = _memory.setter()
    assert switch is not None
    before = switch(request.param)
    yield request.param
    switch(before)


@needs_switch
def test_off_inside_and_as_before_after(advice):
    with _memory.small_pages():
        assert _advice() is False
    assert _advice() is advice


@needs_switch
def test_overlapping_blocks_restore_after_the_last(advice):
    """Two threads' blocks overlap: the first to end must not turn the advice back on under
    the other, and the last to end restores the setting from before both."""
    entered, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with _memory.small_pages():
            entered.set()
            release.wait(10)
            seen.append(_advice())

    worker = threading.Thread(target=other)
    worker.start()
    assert entered.wait(10)
    with _memory.small_pages():
        pass  # ends while the other block still runs
    release.set()
    worker.join(10)
    assert seen == [False]
    assert _advice() is advice


@needs_switch
def test_the_fit_restores_the_advice_also_when_it_fails(advice):
    rng = np.random.default_rng(0)
    finder = PrototypeFinder(k=50, seed=0)
    finder.partial_fit(rng.normal(size=(2, 4, 3, 3)).astype(np.float32),
                       sample_index=np.arange(2))
    with pytest.raises(WhylookError, match="K=50 prototypes need at least 50 feature vectors"):
        finder.finalize()
    assert _advice() is advice
    finder = PrototypeFinder(k=4, seed=0)
    finder.partial_fit(rng.normal(size=(20, 4, 3, 3)).astype(np.float32),
                       sample_index=np.arange(20))
    assert finder.finalize().k == 4
    assert _advice() is advice


def test_the_program_keeps_freed_memory_and_the_library_does_not(monkeypatch, capsys):
    """The ``whylook`` program sets glibc's allocator to keep freed memory (a process of its
    own); ``cli.main``, which tests and callers run in their process, never does."""
    import os
    import subprocess
    import sys
    import tomllib

    from whylook import cli

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["whylook"] == "whylook.cli:program"
    try:
        glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        glibc = False
    code = "from whylook._memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(glibc)

    calls: list[int] = []
    monkeypatch.setattr(_memory, "keep_freed_memory", lambda: bool(calls.append(1)))
    assert cli.main(["report", "/nonexistent-run"]) == 2
    assert "error:" in capsys.readouterr().err
    assert calls == []
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    assert cli.program() == 0
    assert calls == [1]
