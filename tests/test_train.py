"""Training with checkpoints: the run folder, determinism, seeds, clean failure, and every
bad CLI input (one ``error:`` line, exit 2, no run folder left behind)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_run import USER_MODELS
from whylook import _io
from whylook.cli import main
from whylook.data import DataSource, load_data
from whylook.errors import WhylookError
from whylook.models import build_model
from whylook.run import INCOMPLETE_MARKER, MIN_CHECKPOINTS, RunFolder
from whylook.schedule import checkpoint_steps
from whylook.train import evaluate, train

# whylook.train is the function (re-exported by the package); this is the module.
train_mod = importlib.import_module("whylook.train")

# 20 digits per class: 200 training images, batches of 50 -> 4 steps per epoch, 8 in all.
TINY = {"epochs": 2, "checkpoints": 4, "batch_size": 50, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def tiny_data() -> DataSource:
    return load_data("mnist5k", limit_per_class=20)


@pytest.fixture(scope="module")
def baseline(tiny_data: DataSource, tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    return train(tiny_data, "smallcnn", seed=0, out=tmp_path_factory.mktemp("runs") / "a", **TINY)


def _bytes(run: RunFolder) -> list[bytes]:
    return [(run.path / c.file).read_bytes() for c in run.checkpoints]


def test_run_folder_follows_the_output_contract(baseline: RunFolder, tiny_data) -> None:
    manifest = json.loads((baseline.path / "run.json").read_text())
    assert manifest["schema"] == "whylook.run/1"
    assert manifest["source"] == "train"
    config = manifest["config"]
    assert config["model"] == "smallcnn"
    assert config["data"] == "mnist5k"
    assert config["data_limit_per_class"] == 20
    assert config["layer"] == "block3"
    assert config["layer_shape"] == [64, 7, 7]
    assert (config["epochs"], config["batch_size"], config["lr"]) == (2, 50, 1e-3)
    assert (config["schedule"], config["steps_per_epoch"], config["total_steps"]) == ("log", 4, 8)
    assert manifest["classes"] == list("0123456789")
    assert manifest["seeds"] == {"seed": 0, "data_seed": 0}
    assert {"torch", "torchvision", "numpy", "whylook"} <= set(manifest["versions"])
    assert len(manifest["measured"]["seconds_per_epoch"]) == 2
    assert manifest["data"]["digest"] == tiny_data.digest
    steps = [c["step"] for c in manifest["checkpoints"]]
    assert steps == checkpoint_steps(8, 4, "log") == [0, 1, 3, 8]
    assert [c["epoch"] for c in manifest["checkpoints"]] == [0.0, 0.25, 0.75, 2.0]
    assert [c["index"] for c in manifest["checkpoints"]] == [0, 1, 2, 3]
    assert not (baseline.path / INCOMPLETE_MARKER).exists()
    # The recorded accuracy is the final model's accuracy on the test split.
    final = baseline.load_model(-1)
    assert not final.training
    accuracy, loss = evaluate(final, tiny_data.test)
    assert accuracy == baseline.checkpoints[-1].test_accuracy
    assert loss == pytest.approx(baseline.checkpoints[-1].test_loss, rel=1e-5)
    # Training changed the weights.
    first, last = (_io.load_weights(baseline.path / c.file) for c in baseline.checkpoints[::3])
    assert not torch.equal(first["block3.conv.weight"], last["block3.conv.weight"])


def test_same_seeds_give_bit_identical_checkpoints(baseline, tiny_data, tmp_path: Path) -> None:
    again = train(tiny_data, "smallcnn", seed=0, out=tmp_path / "b", **TINY)
    assert _bytes(again) == _bytes(baseline)


def test_data_seed_changes_the_order_but_not_the_initialisation(
    baseline, tiny_data, tmp_path: Path
) -> None:
    other_order = _bytes(train(tiny_data, seed=0, data_seed=1, out=tmp_path / "c", **TINY))
    base = _bytes(baseline)
    assert other_order[0] == base[0]
    assert other_order[-1] != base[-1]
    other_init = _bytes(train(tiny_data, seed=1, data_seed=0, out=tmp_path / "d", **TINY))
    assert other_init[0] != base[0]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_callers_no_grad_or_inference_mode_changes_nothing(
    baseline, tiny_data, tmp_path: Path, context
) -> None:
    """Notebooks often run everything under no_grad or inference_mode: train must still
    train, and explain must still take gradients through checkpoints it loads there."""
    from whylook.explain import explain

    with context():
        again = train(tiny_data, "smallcnn", seed=0, out=tmp_path / "b", **TINY)
        inside = explain(again, analysis_size=60, k=5, progress=False)
    assert _bytes(again) == _bytes(baseline)
    # Copied without analysis/: the explain outside computes every pass again.
    copy = shutil.copytree(again.path, tmp_path / "c", ignore=shutil.ignore_patterns("analysis"))
    outside = explain(RunFolder.open(copy), analysis_size=60, k=5, progress=False)
    assert float(inside.arrays["saliency"].max()) > 0
    for name in ("saliency", "confidence", "beta", "beta_z"):
        np.testing.assert_array_equal(inside.arrays[name], outside.arrays[name])


def test_a_callers_float64_default_changes_nothing(baseline, tiny_data, tmp_path: Path) -> None:
    """torch.set_default_dtype(torch.float64), common in scientific notebooks: models are
    still built in float32, the images' type, and train the same weights."""
    from whylook.explain import explain

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = train(tiny_data, "smallcnn", seed=0, out=tmp_path / "b", **TINY)
        result = explain(again, analysis_size=60, k=5, progress=False)
        assert again.load_model(-1).block3.conv.weight.dtype == torch.float32
        assert torch.get_default_dtype() == torch.float64  # the caller's setting is kept
    finally:
        torch.set_default_dtype(previous)
    assert _bytes(again) == _bytes(baseline)
    assert float(result.arrays["saliency"].max()) > 0


def test_training_leaves_the_callers_rng_alone(tiny_data, tmp_path: Path) -> None:
    before = torch.get_rng_state()
    train(tiny_data, out=tmp_path / "r", **{**TINY, "epochs": 1, "checkpoints": 3})
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("pre_existing", [False, True])
def test_a_failure_during_training_leaves_no_run_folder(
    tiny_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error, pre_existing: bool
) -> None:
    calls = []

    def failing_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", failing_evaluate)
    out = tmp_path / "run"
    if pre_existing:
        out.mkdir()
    with pytest.raises(type(error)):
        train(tiny_data, out=out, **TINY)
    assert len(calls) == 2
    if pre_existing:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()


def test_output_folder_rules(baseline, tiny_data, tmp_path: Path) -> None:
    with pytest.raises(WhylookError, match="already holds a run"):
        train(tiny_data, out=baseline.path, **TINY)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(WhylookError, match="not empty"):
        train(tiny_data, out=tmp_path / "busy", **TINY)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"
    # The leftovers of a killed run (marked incomplete) are replaced by a new run.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / INCOMPLETE_MARKER).write_text("")
    (killed / "checkpoints" / "ckpt-0000.safetensors").write_bytes(b"junk")
    with pytest.raises(WhylookError, match="incomplete"):
        RunFolder.open(killed)
    run = train(tiny_data, out=killed, **{**TINY, "epochs": 1, "checkpoints": 3})
    assert len(run.checkpoints) == 3


def test_an_explicit_layer_is_recorded_and_validated(tiny_data, tmp_path: Path) -> None:
    run = train(
        tiny_data, layer="block2", out=tmp_path / "l", **{**TINY, "epochs": 1, "checkpoints": 3}
    )
    assert run.layer == "block2"
    assert run.config["layer_shape"] == [64, 7, 7]
    assert run.build_model().whylook_layer == "block2"
    custom = DataSource("my arrays", tiny_data.classes, tiny_data.train, tiny_data.test)
    with pytest.raises(WhylookError, match="cannot be loaded again"):
        train(custom, out=tmp_path / "x", **TINY)
    assert not (tmp_path / "x").exists()


def test_cli_train_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [
        "train",
        "--epochs",
        "1",
        "--checkpoints",
        "3",
        "--batch-size",
        "1000",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trained smallcnn on mnist5k: 3 checkpoints" in printed
    assert [c.step for c in RunFolder.open(out).checkpoints] == [0, 1, 4]


@pytest.mark.parametrize("seed", [2**32, -1, 2.0, True, "1"])
def test_seeds_outside_32_bits_are_refused(tiny_data, tmp_path: Path, seed: object) -> None:
    for name in ("seed", "data_seed"):
        with pytest.raises(WhylookError) as info:
            train(tiny_data, out=tmp_path / "s", **{name: seed}, **TINY)
        assert str(info.value) == f"{name} must be a whole number in 0..4294967295, not {seed!r}"
    assert not (tmp_path / "s").exists()


def test_the_largest_seed_trains(tiny_data, tmp_path: Path) -> None:
    run = train(tiny_data, seed=np.int64(2**32 - 1), data_seed=2**32 - 1, out=tmp_path / "s",
                **{**TINY, "epochs": 1, "checkpoints": 3})
    assert run.manifest["seeds"] == {"seed": 2**32 - 1, "data_seed": 2**32 - 1}


@pytest.mark.parametrize("checkpoints", [-1, 0, 1, 2])
def test_fewer_than_three_checkpoints_are_refused_before_anything_is_written(
    tiny_data, tmp_path: Path, checkpoints: int
) -> None:
    """explain needs 3 checkpoints (initialisation, one from training, final): a run with
    fewer could never be explained, so train refuses it up front, naming that minimum
    (also for 0 and below, once refused as ">= 1")."""
    with pytest.raises(WhylookError) as info:
        train(tiny_data, out=tmp_path / "few", **{**TINY, "checkpoints": checkpoints})
    assert str(info.value) == (
        f"--checkpoints (checkpoints) {checkpoints}: the analysis needs at least 3 checkpoints "
        "(the initialisation, one from training, the final); ask for 3 or more"
    )
    assert not (tmp_path / "few").exists()


def test_cli_help_states_the_minimum_number_of_checkpoints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"number of checkpoints, T+1: at least {MIN_CHECKPOINTS} (default 12)" in text


@pytest.mark.parametrize("out", [None, 3])
def test_out_must_be_a_path(tiny_data, out: object) -> None:
    with pytest.raises(WhylookError) as info:
        train(tiny_data, out=out, **TINY)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"out must be the path of the run folder to create (a str or os.PathLike), not {out!r}"
    )



USER_MODEL_CLI_ERRORS = {
    "wrong_classes": r"returns logits of shape \(2, 11\) for a batch of 2 images, not \(2, 10\)",
    "tuple_out": "returns a tuple, not a tensor; its forward must return one",
    "no_params": "has no parameters, so there is nothing to train",
    "frozen": r"has no trainable parameters \(every one has requires_grad=False\)",
    "double": "has float64 weights; return a float32 model",
    "raises": "factory train_models:raises raised RuntimeError: boom inside the factory; ",
}


@pytest.mark.parametrize("factory", sorted(USER_MODEL_CLI_ERRORS))
def test_a_user_model_that_cannot_train_is_refused_before_training(
    factory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "train_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(train_mod, "_fit", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "out"
    try:
        code = main(["train", "--model", f"train_models:{factory}", "--epochs", "1",
                     "--checkpoints", "3", "--device", "cpu", "--out", str(out)])
    finally:
        sys.modules.pop("train_models", None)
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: model train_models:{factory} ") or factory == "raises"
    assert re.search(USER_MODEL_CLI_ERRORS[factory], lines[0]), lines[0]
    assert not out.exists()


def _npz_without_y_test(tmp: Path) -> str:
    np.savez(tmp / "partial.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.arange(4) % 2)
    return f"npz:{tmp / 'partial.npz'}"


def _folder(tmp: Path, classes: int, images: bool) -> str:
    from PIL import Image

    for split in ("train", "test"):
        for c in range(classes):
            folder = tmp / "tree" / split / f"class{c}"
            folder.mkdir(parents=True)
            if images:
                Image.new("L", (8, 8)).save(folder / "a.png")
    return f"folder:{tmp / 'tree'}"


def _unfitting_checkpoint(tmp: Path) -> str:
    model = build_model("smallcnn", num_classes=3, in_channels=1, image_size=28)
    torch.save(model.state_dict(), tmp / "three_classes.pt")
    return str(tmp / "three_classes.pt")


CLI_ERRORS = {
    "missing data path": (lambda t: ["train", "--data", "npz:/no/such.npz"], "does not exist"),
    "npz without keys": (
        lambda t: ["train", "--data", _npz_without_y_test(t)],
        "lacks x_test, y_test",
    ),
    "folder without images": (
        lambda t: ["train", "--data", _folder(t, 2, images=False)],
        "no images",
    ),
    "folder with one class": (
        lambda t: ["train", "--data", _folder(t, 1, images=True)],
        "1 class folder",
    ),
    "unknown model": (lambda t: ["train", "--model", "resnet51"], "unknown model"),
    "layer without a map": (lambda t: ["train", "--layer", "classifier"], r"not \(B, d, h, w\)"),
    "unknown layer": (lambda t: ["train", "--layer", "block9"], "no layer 'block9'"),
    "too many checkpoints": (
        lambda t: ["train", "--epochs", "1", "--batch-size", "1000", "--checkpoints", "9"],
        "only 4 optimizer steps",
    ),
    "bad epochs": (lambda t: ["train", "--epochs", "0"], "epochs must be"),
    "seed too large": (
        lambda t: ["train", "--seed", str(10**23)],
        rf"seed must be a whole number in 0\.\.4294967295, not {10**23}$",
    ),
    "data seed too large": (
        lambda t: ["train", "--data-seed", str(2**32)],
        r"^error: data_seed must be a whole number in 0\.\.4294967295, not 4294967296$",
    ),
    "negative seed": (
        lambda t: ["train", "--seed", "-1"],
        r"^error: seed must be a whole number in 0\.\.4294967295, not -1$",
    ),
    "model without a module": (
        lambda t: ["train", "--model", ".rel:f"],
        r"model '\.rel:f' does not name a module; use package\.module:factory",
    ),
    "checkpoint that does not fit": (
        lambda t: ["import", *[_unfitting_checkpoint(t)] * 3],
        r"does not fit the model: 'classifier\.fc2\.weight' is 3x128",
    ),
    "missing checkpoint": (
        lambda t: ["import", str(t / "a.pt"), str(t / "b.pt"), str(t / "c.pt")],
        "does not exist",
    ),
}
if not torch.cuda.is_available():
    CLI_ERRORS["cuda without a GPU"] = (lambda t: ["train", "--device", "cuda"], "no CUDA GPU")


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_bad_input_is_one_error_line_and_no_run_folder(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_argv, message = CLI_ERRORS[case]
    out = tmp_path / "out"
    code = main([*make_argv(tmp_path), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_numpy_counts_train_and_bad_counts_are_one_line(tiny_data, tmp_path: Path) -> None:
    run = train(tiny_data, out=tmp_path / "np", **{**TINY, "epochs": np.int64(1),
                                                   "batch_size": np.int64(50),
                                                   "checkpoints": np.int64(3)})
    assert len(run.checkpoints) == 3  # run.json took them (NumPy integers are no JSON)
    for bad in (3.5, "5", True, None):
        with pytest.raises(WhylookError, match=rf"^checkpoints must be a whole number >= 3, "
                                               rf"not {re.escape(repr(bad))}$"):
            train(tiny_data, out=tmp_path / "bad", **{**TINY, "checkpoints": bad})
    # The epoch schedule gives epochs + 1 checkpoints whatever was asked for.
    with pytest.raises(WhylookError, match=r"the epoch schedule gives 2 checkpoints over 1 "
                                           r"epoch\(s\); the analysis needs at least 3"):
        train(tiny_data, out=tmp_path / "epoch", schedule="epoch",
              **{**TINY, "epochs": 1, "checkpoints": 12})
    assert not (tmp_path / "bad").exists()
    assert not (tmp_path / "epoch").exists()
