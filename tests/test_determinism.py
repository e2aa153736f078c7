"""The same command twice on CPU gives the same result: byte-identical checkpoints and
``explanation.json``, equal arrays, and run.json equal apart from its timings.

``arrays.npz`` itself is compared array by array: numpy stamps each zip member with the
time of writing, so its bytes differ even when every array is equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _tiny_run import (
    assert_same_arrays,
    baseline,
    checkpoint_bytes,
    copy_run,
    explain_argv,
    load_arrays,
    manifest_without_timing,
    train_argv,
)
from whylook.cli import main


def _explanation(run: Path) -> bytes:
    return (run / "analysis" / "explanation.json").read_bytes()


def test_train_twice_gives_identical_runs(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    data, reference = baseline(tmp_path_factory)
    again = tmp_path / "run"
    assert main(train_argv(data, again)) == 0
    assert checkpoint_bytes(again) == checkpoint_bytes(reference)
    assert manifest_without_timing(again) == manifest_without_timing(reference)


def test_explain_twice_gives_byte_identical_explanations(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    _, reference = baseline(tmp_path_factory)
    # From scratch in another copy of the run: no cache shared with the reference.
    fresh = copy_run(reference, tmp_path / "run")
    assert main(explain_argv(fresh)) == 0
    assert _explanation(fresh) == _explanation(reference)
    assert_same_arrays(load_arrays(fresh), load_arrays(reference))
    # Once more in the same folder: every stage now comes from the cache, same result.
    assert main(explain_argv(fresh)) == 0
    assert _explanation(fresh) == _explanation(reference)
    assert_same_arrays(load_arrays(fresh), load_arrays(reference))
    # A different seed is a different analysis: the comparison above can fail.
    assert main([*explain_argv(fresh), "--seed", "1"]) == 0
    assert _explanation(fresh) != _explanation(reference)
