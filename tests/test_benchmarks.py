"""The benchmark's stage clock still finds every function it times in whylook's modules."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_analysis.py"


def test_the_stage_clock_patches_existing_functions_and_puts_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = importlib.util.spec_from_file_location("bench_analysis", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_analysis", bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    ex = importlib.import_module("whylook.explain")  # the module, not the function
    before = ex.write_bytes
    with bench.StageClock() as clock:  # raises when a timed name no longer exists
        assert ex.write_bytes is not before
        assert clock.seconds == {}
    assert ex.write_bytes is before
