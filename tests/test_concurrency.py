"""Two commands on the same run folder at once: the second gets a clear one-line error
(the folder's lock), writes nothing, and the first finishes with the same result as if it
had run alone.

The first command is a real subprocess, paused right after it took the lock (see
``_cli_hooks.py``), so the overlap is certain rather than a matter of timing.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from _tiny_run import (
    assert_same_arrays,
    baseline,
    checkpoint_bytes,
    cli_command,
    copy_run,
    explain_argv,
    load_arrays,
    manifest_without_timing,
    subprocess_env,
    train_argv,
)
from whylook._io import run_lock
from whylook.cli import main

IN_USE = "is in use by another whylook command; wait for it to finish and try again"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _second_command_fails(argv: list[str], message: str, capsys) -> None:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert message in err[0], err[0]


def _start_paused(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(
        [cli_command([])[0], "-m", "_cli_hooks", "pause", str(ready), str(go), "--", *argv],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the first command never took the lock: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return proc, go


def test_commands_on_a_folder_that_explain_is_writing_get_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run")
    proc, go = _start_paused(explain_argv(run), tmp_path)
    try:
        before = _snapshot(run)
        _second_command_fails(explain_argv(run), IN_USE, capsys)
        _second_command_fails(["explain", str(run), "--k", "3", "--device", "cpu"], IN_USE, capsys)
        _second_command_fails(["report", str(run)], IN_USE, capsys)
        # A new run cannot be trained into a folder that holds one, busy or not.
        _second_command_fails(train_argv(data, run), "already holds a run", capsys)
        assert _snapshot(run) == before
    finally:
        go.touch()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    # The first command's result is whole and exactly what it gives alone.
    assert (run / "analysis" / "explanation.json").read_bytes() == (
        reference / "analysis" / "explanation.json"
    ).read_bytes()
    assert_same_arrays(load_arrays(run), load_arrays(reference))
    # The first command released the lock: the next one can take it.
    with run_lock(run):
        pass


def test_a_second_train_into_the_same_folder_gets_a_clear_error(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """flock conflicts between two open files even within one process, so holding the
    lock here stands for a first ``train`` that has just started writing the folder."""
    data, reference = baseline(tmp_path_factory)
    out = tmp_path / "run"
    with run_lock(out):
        before = _snapshot(out)
        _second_command_fails(train_argv(data, out), IN_USE, capsys)
        # An import into the same folder is refused the same way.
        ckpts = [str(reference / "checkpoints" / f"ckpt-000{i}.safetensors") for i in (0, 1, 3)]
        _second_command_fails(
            ["import", *ckpts, "--data", f"npz:{data}", "--out", str(out)], IN_USE, capsys
        )
        assert _snapshot(out) == before
    # The lock file left behind does not stop the next train, which gives the usual run.
    assert main(train_argv(data, out)) == 0
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
    assert manifest_without_timing(out) == manifest_without_timing(reference)
