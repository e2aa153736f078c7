"""What a command killed while writing leaves: no page, table or comparison of another run
beside the new results, no temporary files piling up, no "rerun" advice the rerun refuses."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from whylook._io import run_lock
from whylook.errors import WhylookError


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even an ``except Exception``)."""


def test_a_report_killed_among_its_figures_leaves_no_page_of_the_old_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _synthetic_run import make_synthetic_run
    from whylook.report import report

    run = make_synthetic_run(tmp_path)
    page = report(run)
    out = page.parent
    # A killed earlier report's temporary files are cleared by the next one.
    stale = [out / ".class-001-beta.png.abc123.tmp", out / "patches" / ".prototype-P-1.png.x.tmp",
             out / ".index.html.y.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    rep = importlib.import_module("whylook.report")
    real = rep.write_bytes
    written = []

    def dies_after_three(path: Path, data: bytes) -> Path:
        if len(written) == 3:
            raise _Killed
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(rep, "write_bytes", dies_after_three)
    with pytest.raises(_Killed):
        report(run)
    assert not page.exists()  # the old page would show three of the new figures
    assert not any(p.exists() for p in stale)
    monkeypatch.setattr(rep, "write_bytes", real)
    assert report(run).is_file()


def test_compare_holds_run_a_from_its_read_to_its_write(
    tmp_path: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _tiny_run import baseline, copy_run
    from whylook.compare import compare

    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run", analysis=True)
    cmp = importlib.import_module("whylook.compare")
    reads = []
    monkeypatch.setattr(cmp, "require_explanation",
                        lambda folder: reads.append(folder) or pytest.fail("read unlocked"))
    with run_lock(run), pytest.raises(WhylookError, match="is in use by another whylook"):
        compare(run, run, device="cpu")
    assert reads == []  # refused before A's explanation was read, not at the write
    assert not (run / "compare").exists()


@pytest.mark.parametrize("complete", [True, False])
def test_a_ctrl_c_after_the_run_folder_is_complete_says_so(
    tmp_path: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], complete: bool
) -> None:
    from _tiny_run import baseline
    from whylook.cli import main

    _, reference = baseline(tmp_path_factory)
    run_mod = importlib.import_module("whylook.run")
    real = run_mod.RunFolder.open.__func__
    out = tmp_path / "imported"

    def interrupted(cls: type, path: object) -> object:
        # import's last step opens the finished folder; Ctrl-C lands there (or, for the
        # incomplete case, while the folder is still being written).
        if complete or Path(str(path)) != out:
            raise KeyboardInterrupt
        return real(cls, path)

    if complete:
        monkeypatch.setattr(run_mod.RunFolder, "open", classmethod(interrupted))
    else:
        monkeypatch.setattr(run_mod._io, "save_weights",
                            lambda *_a, **_k: (_ for _ in ()).throw(KeyboardInterrupt()))
    ckpts = sorted(str(p) for p in (reference / "checkpoints").glob("*.safetensors"))
    code = main(["import", *ckpts, "--data", f"npz:{tmp_path_factory.getbasetemp()}"
                 "/tiny-baseline/tiny.npz", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 130
    if complete:
        assert err == (f"error: interrupted after the run folder {out} was complete; it is "
                       f"ready (whylook explain {out})")
        assert (out / "run.json").is_file()
    else:
        assert err == "error: interrupted; rerun the same command to resume"
        assert not out.exists()
