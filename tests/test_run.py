"""Run folders: importing foreign checkpoints, loading models, and every way a run folder
can be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from whylook import _io
from whylook.data import DataSource, load_data
from whylook.errors import WhylookError
from whylook.models import build_model
from whylook.run import INCOMPLETE_MARKER, RunFolder, import_checkpoints
from whylook.train import evaluate


@pytest.fixture(scope="module")
def tiny_data() -> DataSource:
    return load_data("mnist5k", limit_per_class=10)


def _model(seed: int, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("smallcnn", num_classes=num_classes, in_channels=1, image_size=28)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three checkpoints 'trained elsewhere', in three file formats."""
    folder = tmp_path_factory.mktemp("foreign")
    files = [folder / "a.pt", folder / "b.safetensors", folder / "c.pth"]
    torch.save(_model(0).state_dict(), files[0])
    save_file(dict(_model(1).state_dict()), str(files[1]))
    torch.save({"state_dict": _model(2).state_dict()}, files[2])  # Lightning-style wrapper
    return files


@pytest.fixture(scope="module")
def imported(foreign, tiny_data, tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    out = tmp_path_factory.mktemp("runs") / "imported"
    return import_checkpoints(
        foreign,
        data=tiny_data,
        model="smallcnn",
        steps=[0, 5, 20],
        device="cpu",
        out=out,
        progress=False,
    )


def test_import_converts_to_safetensors_and_evaluates(imported, foreign, tiny_data) -> None:
    assert [c.step for c in imported.checkpoints] == [0, 5, 20]
    assert all(c.epoch is None for c in imported.checkpoints)
    assert imported.layer == "block3"
    assert imported.classes == tuple("0123456789")
    assert imported.manifest["source"] == "import"
    for seed, info in enumerate(imported.checkpoints):
        assert info.file.endswith(".safetensors")
        stored = _io.load_weights(imported.path / info.file)
        original = _model(seed).state_dict()
        assert stored.keys() == original.keys()
        assert all(torch.equal(stored[k], original[k]) for k in original)
        accuracy, loss = evaluate(_model(seed), tiny_data.test)
        assert info.test_accuracy == accuracy
        assert info.test_loss == pytest.approx(loss, rel=1e-6)
    # One record per file, each naming its own file and hash.
    records = imported.manifest["imported"]
    assert [r["file"] for r in records] == [str(f.resolve()) for f in foreign]
    assert [r["sha256"] for r in records] == [_io.file_digest(f) for f in foreign]
    assert len({r["sha256"] for r in records}) == 3  # three files, three different hashes
    assert [r["normalize_filled"] for r in records] == [False] * 3


def test_load_model_and_friends(imported: RunFolder, tiny_data) -> None:
    # Loading a checkpoint leaves the caller's torch random state where it was (the model
    # that receives the weights is initialised aside).
    torch.manual_seed(3)
    model = imported.load_model(1)
    imported.state_dict(2)
    after_load = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(after_load, torch.rand(2))
    assert not model.training
    expected = _model(1).state_dict()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert torch.equal(
        imported.load_model(-1).state_dict()["classifier.fc2.bias"],
        _model(2).state_dict()["classifier.fc2.bias"],
    )
    fresh = imported.build_model()
    assert fresh.whylook_layer == "block3"
    assert fresh.training
    assert imported.data().digest == tiny_data.digest
    with pytest.raises(WhylookError, match=r"checkpoints 0\.\.2, not 7"):
        imported.load_model(7)
    reopened = RunFolder.open(imported.path)
    assert reopened.checkpoints == imported.checkpoints


def test_import_fills_missing_normalisation_and_strips_dataparallel(
    tiny_data, tmp_path: Path
) -> None:
    state = {
        f"module.{k}": v
        for k, v in _model(0).state_dict().items()
        if not k.startswith("normalize.")
    }
    torch.save(state, tmp_path / "dp.pt")
    torch.save(_model(1).state_dict(), tmp_path / "full.pt")
    torch.save(_model(2).state_dict(), tmp_path / "last.pt")
    torch.manual_seed(5)
    run = import_checkpoints(
        [tmp_path / "dp.pt", tmp_path / "full.pt", tmp_path / "last.pt"],
        data=tiny_data,
        model="smallcnn",
        device="cpu",
        out=tmp_path / "run",
    )
    after_import = torch.rand(2)
    torch.manual_seed(5)
    assert torch.equal(after_import, torch.rand(2))  # the caller's random state is left alone
    assert [c.step for c in run.checkpoints] == [0, 1, 2]
    assert [r["normalize_filled"] for r in run.manifest["imported"]] == [True, False, False]
    mean = run.load_model(0).state_dict()["normalize.mean"].flatten().tolist()
    assert mean == pytest.approx(list(tiny_data.channel_stats()[0]))


def test_import_reads_training_state_files_and_wrapper_prefixes(
    tiny_data, tmp_path: Path
) -> None:
    """What training scripts commonly save: the weights inside a training-state dict, and
    key prefixes from the wrapper the model was in. Each gives exactly the plain weights."""
    models = [_model(seed) for seed in range(4)]
    torch.save({"model": models[0].state_dict(), "epoch": 3,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, tmp_path / "a.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in models[1].state_dict().items()},
                "hyper_parameters": {"lr": 1e-3}}, tmp_path / "b.ckpt")  # Lightning
    torch.save({f"_orig_mod.{k}": v for k, v in models[2].state_dict().items()},
               tmp_path / "c.pt")  # torch.compile
    torch.save({f"module.model.{k}": v for k, v in models[3].state_dict().items()},
               tmp_path / "d.pt")  # two wrappers
    run = import_checkpoints([tmp_path / n for n in ("a.pt", "b.ckpt", "c.pt", "d.pt")],
                             data=tiny_data, model="smallcnn", device="cpu", out=tmp_path / "run",
                             progress=False)
    for i, model in enumerate(models):
        loaded = run.load_model(i).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items()), i


def test_import_refuses_ambiguous_or_foreign_prefixes(tiny_data, tmp_path: Path) -> None:
    state = _model(0).state_dict()
    torch.save({"model": state, "ema": state}, tmp_path / "two.pt")
    with pytest.raises(WhylookError, match=r"holds several state dicts \(model, ema\); save"):
        import_checkpoints([tmp_path / "two.pt"] * 3, data=tiny_data, model="smallcnn",
                           device="cpu", out=tmp_path / "a")
    # A prefix whose removal does not reach the model's names is reported as it is.
    torch.save({f"backbone.{k}x": v for k, v in state.items()}, tmp_path / "other.pt")
    with pytest.raises(WhylookError, match=r"unexpected key 'backbone\.normalize\.meanx'"):
        import_checkpoints([tmp_path / "other.pt"] * 3, data=tiny_data, model="smallcnn",
                           device="cpu", out=tmp_path / "b")


def test_import_refuses_before_writing_anything(foreign, tiny_data, tmp_path: Path) -> None:
    torch.save(_model(0, num_classes=3).state_dict(), tmp_path / "three.pt")
    out = tmp_path / "out"
    # The bad checkpoint is last: the good ones before it must not have been written.
    with pytest.raises(WhylookError, match=r"three\.pt does not fit the model"):
        import_checkpoints(
            [*foreign, tmp_path / "three.pt"], data=tiny_data, model="smallcnn", out=out
        )
    assert not out.exists()
    for steps, message in (([0, 3, 3], "strictly increasing"), ([0, 1], "give one each")):
        with pytest.raises(WhylookError, match=message):
            import_checkpoints(foreign, data=tiny_data, model="smallcnn", steps=steps, out=out)
    with pytest.raises(WhylookError, match="at least 3"):
        import_checkpoints(foreign[:1], data=tiny_data, model="smallcnn", out=out)
    torch.save({"weights": "not tensors"}, tmp_path / "odd.pt")
    with pytest.raises(WhylookError, match="state dict of tensors"):
        import_checkpoints(
            [foreign[0], tmp_path / "odd.pt", foreign[1]], data=tiny_data, model="smallcnn",
            out=out,
        )
    assert not out.exists()


def test_import_of_two_checkpoints_is_refused_before_anything_is_written(
    foreign, tiny_data, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain needs 3 checkpoints, so an import of 2 good ones is refused up front: no run
    folder that could never be explained."""
    from whylook.cli import main

    out = tmp_path / "out"
    message = ("2 checkpoint(s) given; the analysis needs at least 3 (e.g. the "
               "initialisation, one from training and the final model)")
    with pytest.raises(WhylookError) as info:
        import_checkpoints(foreign[:2], data=tiny_data, model="smallcnn", device="cpu", out=out)
    assert str(info.value) == message
    assert not out.exists()
    capsys.readouterr()
    assert main(["import", *map(str, foreign[:2]), "--device", "cpu", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_cli_import(foreign, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from whylook.cli import main

    out = tmp_path / "cli"
    argv = [
        "import",
        *map(str, foreign),
        "--steps",
        "0,10,30",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "imported 3 checkpoints" in capsys.readouterr().out
    assert [c.step for c in RunFolder.open(out).checkpoints] == [0, 10, 30]


# ----------------------------------------------------------------------------- broken runs


def _copy(run: RunFolder, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.path, tmp_path / "copy"))


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "run.json").read_text())
    edit(manifest)
    (path / "run.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: shutil.rmtree(p), "does not exist"),
        (lambda p: (p / "run.json").unlink(), "not a whylook run folder"),
        (
            lambda p: ((p / "run.json").unlink(), (p / INCOMPLETE_MARKER).write_text("")),
            "incomplete",
        ),
        (lambda p: (p / "run.json").write_text('{"schema": "whylook.run/1", "conf'), "corrupt"),
        (lambda p: _edit_manifest(p, lambda m: m.update(schema="other/2")), "schema 'other/2'"),
        (lambda p: (p / "checkpoints" / "ckpt-0001.safetensors").unlink(), "is missing"),
        (lambda p: _edit_manifest(p, lambda m: m.pop("checkpoints")), "malformed"),
        (lambda p: _edit_manifest(p, lambda m: m["config"].pop("model")), "malformed"),
        (
            lambda p: _edit_manifest(p, lambda m: m["checkpoints"][0].update(file="../x")),
            "inside the folder",
        ),
    ],
)
def test_broken_run_folders_are_one_line_errors(
    imported: RunFolder, tmp_path: Path, damage, message: str
) -> None:
    path = _copy(imported, tmp_path)
    damage(path)
    with pytest.raises(WhylookError, match=message) as info:
        RunFolder.open(path)
    assert "\n" not in str(info.value)


def test_a_checkpoint_that_does_not_fit_names_the_key(imported, tmp_path: Path) -> None:
    path = _copy(imported, tmp_path)
    state = dict(_model(0).state_dict())
    state["classifier.fc2.weight"] = torch.zeros(10, 64)
    state["extra.weight"] = torch.zeros(1)
    del state["block1.conv.bias"]
    save_file(state, str(path / "checkpoints" / "ckpt-0001.safetensors"))
    run = RunFolder.open(path)
    with pytest.raises(
        WhylookError,
        match=(
            r"missing key 'block1\.conv\.bias'; unexpected key 'extra\.weight'; "
            r"'classifier\.fc2\.weight' is 10x64 in the checkpoint but 10x128 in the model"
        ),
    ):
        run.load_model(1)
    run.load_model(0)  # the others still load


def test_changed_data_is_detected(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (8, 12, 12), dtype=np.uint8),
        "y_train": np.arange(8) % 2,
        "x_test": rng.integers(0, 256, (4, 12, 12), dtype=np.uint8),
        "y_test": np.arange(4) % 2,
    }
    np.savez(tmp_path / "d.npz", **arrays)
    for i in range(3):
        torch.manual_seed(i)
        m = build_model("smallcnn", num_classes=2, in_channels=1, image_size=12)
        torch.save(m.state_dict(), tmp_path / f"{i}.pt")
    run = import_checkpoints(
        [tmp_path / f"{i}.pt" for i in range(3)],
        data=f"npz:{tmp_path / 'd.npz'}",
        model="smallcnn",
        out=tmp_path / "r",
    )
    assert len(run.data().train) == 8
    arrays["x_train"] = arrays["x_train"][::-1].copy()
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(WhylookError, match="has changed since"):
        run.data()


def test_unreadable_json_is_a_one_line_error(tmp_path: Path) -> None:
    # A folder where a file should be: an OSError that is neither "missing" nor "corrupt".
    (tmp_path / "run.json").mkdir()
    with pytest.raises(WhylookError, match=r"cannot be read \(IsADirectoryError: .*\); check"):
        _io.read_json(tmp_path / "run.json", "run file")
