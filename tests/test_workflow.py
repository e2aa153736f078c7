"""A researcher's own model and training loop brought into whylook: the slips that would
otherwise give a silently wrong analysis are caught, and what the files cannot say is
shown (each checkpoint's test accuracy at import)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_run import baseline, copy_run, png
from whylook import WhylookError, _io, compare, import_checkpoints
from whylook.cli import build_parser, main
from whylook.data import load_data
from whylook.models import build_model, get_layer, model_spec


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return baseline(tmp_path_factory)


def _numbered(run: Path, dest: Path, names: list[str]) -> list[Path]:
    dest.mkdir()
    files = sorted((run / "checkpoints").glob("*.safetensors"))[: len(names)]
    return [Path(shutil.copy(f, dest / n)) for f, n in zip(files, names, strict=True)]


def test_files_numbered_out_of_order_are_refused_unless_steps_confirm(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = reference
    # What `whylook import epoch_*.pt` passes: the shell sorts the digits as text.
    files = _numbered(run, tmp_path / "ckpts", ["epoch_0.pt", "epoch_10.pt", "epoch_2.pt"])
    files = [f.rename(f.with_suffix(".safetensors")) for f in files]
    out = tmp_path / "imported"
    with pytest.raises(WhylookError, match=r"not in the order of the numbers in their names "
                       r"\(epoch_0.safetensors, epoch_10.safetensors, epoch_2.safetensors; a "
                       r"shell glob sorts 10 before 2\).*--steps"):
        import_checkpoints(files, data=f"npz:{data}", model="smallcnn", out=out)
    assert not out.exists()
    # In the order of their numbers, or confirmed with steps, they are imported.
    in_order = [files[0], files[2], files[1]]
    assert len(import_checkpoints(in_order, data=f"npz:{data}", model="smallcnn",
                                  out=out, progress=False).checkpoints) == 3
    confirmed = import_checkpoints(files, data=f"npz:{data}", model="smallcnn",
                                   steps=[0, 5, 9], out=tmp_path / "confirmed", progress=False)
    assert [c.step for c in confirmed.checkpoints] == [0, 5, 9]


def test_cli_import_prints_each_checkpoints_test_accuracy(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = reference
    files = sorted(str(f) for f in (run / "checkpoints").glob("*.safetensors"))
    assert main(["import", *files, "--data", f"npz:{data}", "--device", "cpu",
                 "--out", str(tmp_path / "imp")]) == 0
    out = capsys.readouterr().out
    # The training run measured the same checkpoints on the same test split: the import
    # must show those, not what its own manifest says whatever it measured.
    trained = json.loads((run / "run.json").read_text())["checkpoints"]
    imported = json.loads((tmp_path / "imp" / "run.json").read_text())["checkpoints"]
    assert [c["test_accuracy"] for c in imported] == pytest.approx(
        [c["test_accuracy"] for c in trained], abs=1e-6)
    shown = ", ".join(f"{100 * c['test_accuracy']:.1f}%" for c in trained)
    assert f"test accuracy by checkpoint: {shown} (last " in out


def test_the_suggested_conversion_handles_training_scripts_checkpoints(tmp_path: Path) -> None:
    """torchvision's reference scripts save the model's state beside an argparse.Namespace,
    and many loops add NumPy numbers (best accuracy): whylook refuses those pickles, and the
    command it suggests must turn them into weights."""
    model = build_model("smallcnn", num_classes=3, in_channels=1, image_size=16)
    code = re.fullmatch(r'python -c "(.*)"', _io.CONVERT_COMMAND)
    assert code
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for key in ("model_state_dict", "model", "net"):
        src, dst = tmp_path / f"{key}.pth", tmp_path / f"{key}.safetensors"
        torch.save({key: model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                    "epoch": 3, "args": argparse.Namespace(lr=0.1),
                    "best_acc": np.float64(0.9)}, src)
        with pytest.raises(WhylookError, match="cannot be loaded safely"):
            _io.load_weights(src)
        exec(code[1].replace("IN.pt", str(src)).replace("OUT.safetensors", str(dst)), {})
        converted = _io.load_weights(dst)
        assert converted.keys() == model.state_dict().keys()
        assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_the_suggested_conversion_takes_the_entry_that_holds_the_weights(
    tmp_path: Path
) -> None:
    """A "model" entry may name the architecture ({"model": "resnet18", "weights": ...}):
    the command takes the first entry that holds weights (a state dict or a model), not the
    first known name, and the top level's own tensors when no entry holds any."""
    model = build_model("smallcnn", num_classes=3, in_channels=1, image_size=16)
    state = model.state_dict()
    code = re.fullmatch(r'python -c "(.*)"', _io.CONVERT_COMMAND)
    assert code
    args = argparse.Namespace(arch="smallcnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = {
        "named": {"model": "smallcnn", "weights": state, "args": args},
        "named-known": {"model": "smallcnn", "state_dict": state, "args": args},
        # An optimizer has a state_dict() too, but holds no weights of the model.
        "module": {"model": "smallcnn", "optimizer": optimizer, "net": model},
        "flat": {**state, "args": args},
    }
    for name, obj in checkpoints.items():
        src, dst = tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors"
        torch.save(obj, src)
        with pytest.raises(WhylookError, match="cannot be loaded safely"):
            _io.load_weights(src)
        command = _io.CONVERT_COMMAND.replace("IN.pt", str(src))
        if name == "named":  # once as the user runs it: through a shell
            command = command.replace("OUT.safetensors", str(dst)).replace(
                "python -c", f"{shlex.quote(sys.executable)} -c", 1)
            subprocess.run(["sh", "-c", command], check=True, timeout=120)
        else:
            exec(code[1].replace("IN.pt", str(src)).replace("OUT.safetensors", str(dst)), {})
        converted = _io.load_weights(dst)
        assert converted.keys() == state.keys(), name
        assert all(torch.equal(converted[k], v) for k, v in state.items()), name


def test_runs_on_the_same_images_from_another_path_are_compared(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = reference
    moved = Path(shutil.copy(data, tmp_path / "moved.npz"))
    other = copy_run(run, tmp_path / "other", analysis=True)
    manifest = json.loads((other / "run.json").read_text())
    manifest["config"]["data"] = manifest["data"]["spec"] = f"npz:{moved}"
    (other / "run.json").write_text(json.dumps(manifest))
    result = compare(run, other, out=tmp_path / "c.json", device="cpu")
    assert result.data["matching"]["n_matched"] > 0
    # Other images are still refused.
    manifest["data"]["digest"] = "0" * 32
    (other / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(WhylookError, match="the runs differ in data"):
        compare(run, other, out=tmp_path / "c2.json", device="cpu")


def _factory(num_classes: int, in_channels: int, image_size: tuple[int, int]) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, num_classes))


def test_a_factory_function_is_recorded_by_its_importable_name() -> None:
    assert model_spec(_factory) == f"{__name__}:_factory"
    assert model_spec("smallcnn") == "smallcnn"

    def local(**kwargs: object) -> torch.nn.Module:
        return _factory(2, 1, (8, 8))

    for bad in (local, lambda **kw: None):
        with pytest.raises(WhylookError, match=r"cannot be rebuilt by name later .* define the "
                                               "factory at the top level of an importable module"):
            model_spec(bad)
    with pytest.raises(WhylookError, match=r"model must be a model name .* not int"):
        model_spec(3)
    model = build_model(_factory, num_classes=3, in_channels=1, image_size=8)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_finetune_takes_optimizer_and_batch_size_on_the_command_line() -> None:
    args = build_parser().parse_args(["finetune", "RUN", "--optimizer", "sgd", "--batch-size",
                                      "64", "--lr", "0.05"])
    assert (args.optimizer, args.batch_size, args.lr) == ("sgd", 64, 0.05)


def test_a_folder_with_val_instead_of_test_says_so(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            (tmp_path / "data" / split / c / "0.png").write_bytes(png(40))
    with pytest.raises(WhylookError, match=r"has no test images; add test/<class>/\* images "
                                           r"\(or name its val/ folder test/\)"):
        load_data(f"folder:{tmp_path / 'data'}")


def test_a_wrong_layer_name_hints_with_one_of_the_models_own_nested_names() -> None:
    net = torch.nn.Sequential()
    net.add_module("net", build_model("resnet18", num_classes=2, in_channels=1, image_size=16))
    with pytest.raises(WhylookError, match=r"e\.g\. net\.\w+\)$"):
        get_layer(net, "layer3")


def test_numbered_folders_with_alike_files_are_checked_too(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """A trainer that numbers its folders (checkpoint-500/model.safetensors) names every
    file alike: the order is read from the whole path."""
    data, run = reference
    files = sorted((run / "checkpoints").glob("*.safetensors"))[:3]
    given = []
    for step, f in zip((500, 1000, 1500), files, strict=True):
        (tmp_path / f"checkpoint-{step}").mkdir()
        given.append(Path(shutil.copy(f, tmp_path / f"checkpoint-{step}" / "model.safetensors")))
    glob_order = [given[1], given[2], given[0]]  # 1000, 1500, 500: digits sorted as text
    with pytest.raises(WhylookError, match=r"\(checkpoint-1000/model.safetensors, "
                                           r"checkpoint-1500/model.safetensors, "
                                           r"checkpoint-500/model.safetensors; a shell glob"):
        import_checkpoints(glob_order, data=f"npz:{data}", model="smallcnn",
                           out=tmp_path / "imp")
    for steps in ("0,5,9", [0, 1.7, 2.9]):
        with pytest.raises(WhylookError, match="steps must be a list of whole numbers"):
            import_checkpoints(given, data=f"npz:{data}", model="smallcnn", steps=steps,
                               out=tmp_path / "imp")


class _Normalized(torch.nn.Sequential):
    """The README's advice: normalisation as the model's first layer, before the network
    the checkpoints were saved from."""


def normalized_smallcnn(num_classes: int, in_channels: int,
                        image_size: tuple[int, int]) -> torch.nn.Module:
    from torchvision.transforms import Normalize

    net = build_model("smallcnn", num_classes=num_classes, in_channels=in_channels,
                      image_size=image_size)
    return _Normalized(Normalize([0.5] * in_channels, [0.25] * in_channels), net)


def test_checkpoints_of_the_network_fit_the_model_that_wraps_it(
    reference: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = reference
    files = sorted((run / "checkpoints").glob("*.safetensors"))[:3]
    imported = import_checkpoints(files, data=f"npz:{data}", model=normalized_smallcnn,
                                  out=tmp_path / "imp", progress=False)
    model = imported.load_model(-1)
    saved = _io.load_weights(files[-1])
    assert all(torch.equal(model.state_dict()[f"1.{k}"], v) for k, v in saved.items())


def test_long_silent_stages_have_bars(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The K search and the fits after the passes took most of a minute with nothing on the
    screen at 5,000 samples of 100 classes."""
    from whylook import explain

    run = copy_run(reference[1], tmp_path / "run")
    explain(run, k="auto", analysis_size=60, device="cpu", progress=True)
    err = capsys.readouterr().err
    for bar in ("prototypes: K search", "analysis", "patterns (HDBSCAN)", "mapping (ridge)",
                "structure"):
        assert bar in err, bar
