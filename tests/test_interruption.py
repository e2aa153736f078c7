"""SIGKILL at several points of ``whylook train`` and ``whylook explain``, then a rerun of
the same command: the final outputs equal an uninterrupted run's, and after every kill
nothing in the folder looks complete that is not.

The commands run as real subprocesses (``python -m whylook.cli``). One kill comes from
outside at a moment chosen by polling (as a user's Ctrl-\\ or the OOM killer would); the
others are sent by the process to itself at exact points of a file write (see
``_cli_hooks.py``): half-way through writing a file, with the file written but not yet
renamed, and right after the rename.
"""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
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
    run_cli,
    subprocess_env,
    train_argv,
)
from whylook.cli import main
from whylook.errors import WhylookError
from whylook.explain import load_explanation
from whylook.run import INCOMPLETE_MARKER, RunFolder


def _killed(hook: list[str], argv: list[str]) -> None:
    """Run ``whylook ARGV`` with a kill hook; it must die by SIGKILL."""
    cmd = [cli_command([])[0], "-m", "_cli_hooks", "kill", *hook, "--", *argv]
    res = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert res.returncode == -signal.SIGKILL, (hook, res.returncode, res.stderr[-2000:])


def _temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp"))


def _assert_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert message in err[0], err[0]


def _assert_killed_training_looks_incomplete(
    out: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not (out / "run.json").exists()
    assert (out / INCOMPLETE_MARKER).exists()
    with pytest.raises(WhylookError, match="incomplete"):
        RunFolder.open(out)
    _assert_error(["explain", str(out), "--device", "cpu"], "is incomplete", capsys)
    # Every file under a final name is complete: byte for byte the uninterrupted run's.
    expected = checkpoint_bytes(reference)
    for name, data in checkpoint_bytes(out).items():
        if not name.startswith("."):
            assert data == expected[name], name


def test_train_killed_at_several_points_then_rerun_equals_an_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, reference = baseline(tmp_path_factory)
    out = tmp_path / "run"  # the same folder name as the reference: run.json records none
    argv = train_argv(data, out)

    # 1. From outside, as soon as the first checkpoint is in place (training has begun;
    # four optimizer steps and three checkpoints are still to come, so the kill lands).
    proc = subprocess.Popen(
        cli_command(argv), env=subprocess_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    first = out / "checkpoints" / "ckpt-0000.safetensors"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"train ended before the kill: {stderr[-2000:]}"
    _assert_killed_training_looks_incomplete(out, reference, capsys)

    # 2. Half-way through writing the third checkpoint: a partial temporary file is left.
    _killed(["ckpt-*.safetensors", "3", "mid-write"], argv)
    _assert_killed_training_looks_incomplete(out, reference, capsys)
    partial = _temp_files(out)
    assert [p.name.startswith(".ckpt-0002.safetensors.") for p in partial] == [True]
    assert not (out / "checkpoints" / "ckpt-0002.safetensors").exists()

    # 3. Every checkpoint in place, run.json written but not yet renamed into place.
    _killed(["run.json", "1", "before-rename"], argv)
    _assert_killed_training_looks_incomplete(out, reference, capsys)
    assert sorted(checkpoint_bytes(out)) == sorted(checkpoint_bytes(reference))
    assert [p.name.startswith(".run.json.") for p in _temp_files(out)] == [True]

    # 4. The same command once more completes, and equals the uninterrupted run.
    res = run_cli(argv)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
    assert manifest_without_timing(out) == manifest_without_timing(reference)
    assert not (out / INCOMPLETE_MARKER).exists()
    assert _temp_files(out) == []
    RunFolder.open(out)


def test_explain_killed_at_several_points_then_rerun_equals_an_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run")
    analysis = run / "analysis"
    # An earlier, complete analysis with other settings: a kill must never leave its
    # explanation.json beside the new arrays.
    assert main(["explain", str(run), "--k", "4", "--analysis-size", "45", "--device", "cpu"]) == 0
    old_json = (analysis / "explanation.json").read_bytes()
    old_arrays = load_arrays(run)
    old_cache = {p.name for p in (analysis / "cache").iterdir()}
    argv = explain_argv(run)

    # 1. Half-way through writing the third saliency shard (two are complete).
    _killed(["saliency-*.npz", "3", "mid-write"], argv)
    # The old analysis is untouched, so still complete and consistent.
    assert (analysis / "explanation.json").read_bytes() == old_json
    assert_same_arrays(load_arrays(run), old_arrays)
    new = sorted(p for p in (analysis / "cache").iterdir() if p.name not in old_cache)
    finished = [p for p in new if not p.name.startswith(".")]
    assert [p.name[:9] for p in finished] == ["prototype", "saliency-", "saliency-"]
    assert [p.name[:11] for p in _temp_files(run)] == [".saliency-t"]
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}

    # 2. The new arrays.npz is in place, explanation.json written but not renamed.
    _killed(["explanation.json", "1", "before-rename"], argv)
    assert not (analysis / "explanation.json").exists()
    assert (analysis / "arrays.npz").exists()
    with pytest.raises(WhylookError,
                       match=r"has no explanation yet; run `whylook explain .*` first"):
        load_explanation(run)
    _assert_error(["report", str(run)], "explanation", capsys)
    assert not (run / "report" / "index.html").exists()

    # 3. The same command once more completes, reusing the complete shards of the first
    # attempt (not rewritten), and equals the uninterrupted analysis byte for byte.
    res = run_cli(argv)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (analysis / "explanation.json").read_bytes() == (
        reference / "analysis" / "explanation.json"
    ).read_bytes()
    assert_same_arrays(load_arrays(run), load_arrays(reference))
    for name, stat in kept.items():
        path = analysis / "cache" / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stat, name
    assert _temp_files(run) == []
    assert json.loads(old_json)["settings"]["analysis_size"] == 45  # it was another analysis


def test_a_damaged_cache_file_is_computed_again(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """Cache files are written atomically, so a damaged one was cut short from outside (a
    copy interrupted, a full disk): it is a cache miss, never a result and never an error."""
    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run", analysis=True)
    cache = run / "analysis" / "cache"
    shard = sorted(cache.glob("saliency-*.npz"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    (next(cache.glob("prototypes-*.npz"))).write_bytes(b"PK\x03\x04 not a zip")
    assert main(explain_argv(run)) == 0
    assert (run / "analysis" / "explanation.json").read_bytes() == (
        reference / "analysis" / "explanation.json"
    ).read_bytes()
    assert_same_arrays(load_arrays(run), load_arrays(reference))
    with np.load(shard) as again, np.load(reference / "analysis" / "cache" / shard.name) as ref:
        assert_same_arrays(dict(again), dict(ref))


def test_nothing_in_the_source_writes_a_file_in_place() -> None:
    """A static guard behind the tests above: outside ``whylook._io`` (temp file + rename),
    no code writes a file under its final name, where a kill would leave it half-written."""
    import whylook

    src = Path(whylook.__file__).resolve().parent  # the package under test
    writers = {"write_text", "write_bytes", "savez", "savez_compressed", "save", "savefig",
               "to_csv", "save_file", "dump", "tofile"}
    # (file, call, target): the incompleteness marker is only ever tested for existence.
    allowed = {("run.py", "write_text", "out / INCOMPLETE_MARKER")}
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "_io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            first = node.args[0] if node.args else None
            in_memory = isinstance(first, ast.Name) and first.id in {"buf", "fh"}
            if (
                isinstance(func, ast.Attribute)
                and func.attr in writers
                and not in_memory
                and (path.name, func.attr, ast.unparse(func.value)) not in allowed
            ):
                found.append(f"{path.relative_to(src)}:{node.lineno} {func.attr}")
            # open(path, mode) and Path.open(mode), the mode given by position or keyword.
            is_open = (isinstance(func, ast.Name) and func.id == "open") or (
                isinstance(func, ast.Attribute) and func.attr == "open")
            modes = [*node.args[isinstance(func, ast.Name):],
                     *(k.value for k in node.keywords if k.arg == "mode")]
            # A builtin open's mode not written out counts as a write; a method named open
            # (ZipFile.open(name), RunFolder.open(path)) only with a writing mode string.
            writes = [set(m.value) & set("wax+") if isinstance(m, ast.Constant)
                      and isinstance(m.value, str) else isinstance(func, ast.Name)
                      for m in modes]
            if is_open and any(writes):
                found.append(f"{path.relative_to(src)}:{node.lineno} open(..., mode)")
    assert found == []
