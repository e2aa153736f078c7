"""Bad inputs to ``whylook import``/``train`` and to the run-folder loader: each one is a
one-line WhylookError that names what is wrong, and no run folder is left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _tiny_run import write_tiny_npz
from whylook.cli import main
from whylook.errors import WhylookError
from whylook.models import build_model
from whylook.run import (
    INCOMPLETE_MARKER,
    RunFolder,
    _check_name_order,
    import_checkpoints,
    require_run_folder,
)
from whylook.train import train


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model("smallcnn", num_classes=3, in_channels=1, image_size=16)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"npz:{write_tiny_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')}"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("good")
    files = [folder / f"{seed}.pt" for seed in range(3)]
    for seed, path in enumerate(files):
        torch.save(_state(seed), path)
    return files


@pytest.fixture(scope="module")
def run(good: list[Path], data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    import_checkpoints(good, data=data, model="smallcnn", steps=[0, 4, 9], device="cpu",
                       out=out, progress=False)
    return out


def _refused(files: list[Path], data: str, out: Path, match: str) -> str:
    with pytest.raises(WhylookError, match=match) as info:
        import_checkpoints(files, data=data, model="smallcnn", device="cpu", out=out,
                           progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists()
    return message


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_import_refuses_weights_that_are_not_floating_point(
    dtype: torch.dtype, good: list[Path], data: str, tmp_path: Path
) -> None:
    state = _state(7)
    state["block2.conv1.weight"] = (state["block2.conv1.weight"] * 100).to(dtype)
    path = tmp_path / "cast.safetensors"
    if dtype.is_complex:  # safetensors cannot hold complex tensors; torch.save can
        path = tmp_path / "cast.pt"
        torch.save(state, path)
    else:
        save_file(state, str(path))
    name = str(dtype).removeprefix("torch.")
    _refused([good[0], path, good[1]], data, tmp_path / "out",
             rf"^checkpoint {path} holds 'block2\.conv1\.weight' as {name}, not floating point; "
             r"save the weights as trained \(a float model\.state_dict\(\), not a cast")


def test_import_refuses_the_same_weights_twice(
    good: list[Path], data: str, tmp_path: Path
) -> None:
    _refused([good[0], good[1], good[0]], data, tmp_path / "out",
             rf"^checkpoint {good[0]} is given twice; give each checkpoint of the training once$")
    # The same weights in another format (and with a wrapper's prefix) are the same checkpoint.
    other = tmp_path / "copy.safetensors"
    save_file({f"module.{k}": v for k, v in _state(1).items()}, str(other))
    _refused([good[0], good[1], other], data, tmp_path / "out",
             rf"^checkpoints {good[1]} and {other} hold the same weights; give each checkpoint")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_import_refuses_nan_or_infinite_weights(
    value: float, good: list[Path], data: str, tmp_path: Path
) -> None:
    state = _state(7)
    state["classifier.fc2.weight"][1, 2] = value
    torch.save(state, tmp_path / "diverged.pt")
    _refused([good[0], tmp_path / "diverged.pt", good[1]], data, tmp_path / "out",
             rf"^checkpoint {tmp_path / 'diverged.pt'} holds NaN or infinite weights in "
             r"'classifier\.fc2\.weight' \(a diverged training\); import only the checkpoints")


def test_import_refuses_finite_weights_whose_outputs_overflow(
    good: list[Path], data: str, tmp_path: Path
) -> None:
    # Finite but huge: the logits overflow, and run.json could not hold the test loss.
    state = _state(7)
    state["classifier.fc2.weight"].fill_(3e38)
    state["classifier.fc2.bias"].copy_(torch.tensor([3e38, -3e38, 0.0]))
    torch.save(state, tmp_path / "huge.pt")
    _refused([good[0], tmp_path / "huge.pt", good[1]], data, tmp_path / "out",
             rf"^checkpoint {tmp_path / 'huge.pt'}: the model returned NaN or infinite logits "
             r"\(test loss (nan|inf)\); check the weights for a diverged training")


def test_import_refuses_sparse_tensors(good: list[Path], data: str, tmp_path: Path) -> None:
    state = _state(7)
    state["classifier.fc1.weight"] = state["classifier.fc1.weight"].to_sparse()
    torch.save(state, tmp_path / "sparse.pt")
    _refused([good[0], tmp_path / "sparse.pt", good[1]], data, tmp_path / "out",
             rf"^checkpoint {tmp_path / 'sparse.pt'} holds 'classifier\.fc1\.weight' as a sparse "
             r"tensor \(torch\.sparse_coo\); save the weights dense")


def test_cli_import_of_a_bad_checkpoint_is_one_line(
    good: list[Path], data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["import", str(good[0]), str(good[0]), str(good[1]), "--data", data, "--device", "cpu",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: checkpoint {good[0]} is given twice; give each checkpoint of the "
                   "training once"]


def test_missing_normalisation_is_filled_from_the_data_whatever_came_before(
    data: str, tmp_path: Path
) -> None:
    """A file without Normalize buffers after one with them gets the data's statistics, not
    the buffers of the file before it."""
    full = _state(0)
    full["normalize.mean"].fill_(0.9)
    torch.save(full, tmp_path / "full.pt")
    torch.save({k: v for k, v in _state(1).items() if not k.startswith("normalize.")},
               tmp_path / "bare.pt")
    torch.save(_state(2), tmp_path / "last.pt")
    run = import_checkpoints([tmp_path / n for n in ("full.pt", "bare.pt", "last.pt")],
                             data=data, model="smallcnn", device="cpu", out=tmp_path / "run",
                             progress=False)
    assert [r["normalize_filled"] for r in run.manifest["imported"]] == [False, True, False]
    assert run.state_dict(0)["normalize.mean"].flatten().tolist() == pytest.approx([0.9])
    expected = run.data().channel_stats()[0]
    assert run.state_dict(1)["normalize.mean"].flatten().tolist() == pytest.approx(list(expected))


class _Normalized(torch.nn.Sequential):
    """The README's advice: input normalisation in front of the network, with no weights of
    its own."""


def normalized_smallcnn(num_classes: int, in_channels: int,
                        image_size: tuple[int, int]) -> torch.nn.Module:
    from torchvision.transforms import Normalize

    net = build_model("smallcnn", num_classes=num_classes, in_channels=in_channels,
                      image_size=image_size)
    return _Normalized(Normalize([0.5] * in_channels, [0.25] * in_channels), net)


def plain_sequential(num_classes: int, in_channels: int,
                     image_size: tuple[int, int]) -> torch.nn.Module:
    """A user's network that is itself an nn.Sequential: its own keys start with digits."""
    pixels = image_size[0] * image_size[1]
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * pixels, num_classes))


def test_checkpoints_saved_from_a_wrapper_fit_a_model_that_wraps_the_network(
    data: str, tmp_path: Path
) -> None:
    """A Lightning module (model.) or DataParallel (module.) around the network, imported
    into the README's nn.Sequential(Normalize, net): the wrapper's prefix is swapped for
    the model's."""
    files = [tmp_path / "lightning.ckpt", tmp_path / "dp.pt", tmp_path / "both.pt"]
    torch.save({"state_dict": {f"model.{k}": v for k, v in _state(0).items()}}, files[0])
    torch.save({f"module.{k}": v for k, v in _state(1).items()}, files[1])
    torch.save({f"module.model.{k}": v for k, v in _state(2).items()}, files[2])
    run = import_checkpoints(files, data=data, model=normalized_smallcnn, device="cpu",
                             out=tmp_path / "run", progress=False)
    for i in range(3):
        loaded = run.state_dict(i)
        assert loaded.keys() == {f"1.{k}" for k in _state(i)}
        assert all(torch.equal(loaded[f"1.{k}"], v) for k, v in _state(i).items())


@pytest.mark.parametrize("prefix", ["1.", "module.1.", "model.1."])
def test_a_checkpoint_of_the_wrapper_is_refused_by_the_bare_network(
    prefix: str, good: list[Path], data: str, tmp_path: Path
) -> None:
    """Saved from nn.Sequential(Normalize(mean, std), net), the keys are net's behind "1.":
    dropping that index would load the weights and silently drop the normalisation."""
    path = tmp_path / "wrapped.pt"
    torch.save({f"{prefix}{k}": v for k, v in _state(7).items()}, path)
    message = _refused([good[0], path, good[1]], data, tmp_path / "out",
                       rf"^checkpoint {path} looks saved from a model wrapped in nn\.Sequential "
                       rf"\(every key starts with '{re.escape(prefix)}'\)")
    assert "input normalisation" in message
    assert "give the same wrapper as --model (model)" in message
    # With that wrapper as the model, the same file is imported.
    if prefix == "1.":
        run = import_checkpoints([good[0], path, good[1]], data=data, model=normalized_smallcnn,
                                 device="cpu", out=tmp_path / "run", progress=False)
        assert torch.equal(run.state_dict(1)["1.block2.conv1.weight"],
                           _state(7)["block2.conv1.weight"])


def test_a_network_that_is_an_nn_sequential_still_loads_from_its_wrappers(
    data: str, tmp_path: Path
) -> None:
    """Digits that are the model's own names are no wrapper's: DataParallel and Lightning
    prefixes on an nn.Sequential network's keys are dropped as on any other."""
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append(plain_sequential(3, 1, (16, 16)).state_dict())
    files = [tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"]
    torch.save({f"module.{k}": v for k, v in states[0].items()}, files[0])
    torch.save({"state_dict": {f"model.{k}": v for k, v in states[1].items()}}, files[1])
    torch.save(states[2], files[2])
    run = import_checkpoints(files, data=data, model=plain_sequential, device="cpu",
                             out=tmp_path / "run", progress=False)
    for i, state in enumerate(states):
        assert all(torch.equal(run.state_dict(i)[k], v) for k, v in state.items())


def test_a_checkpoint_of_a_sequential_with_the_network_first_loads_into_the_network(
    good: list[Path], data: str, tmp_path: Path
) -> None:
    """nn.Sequential(net, nn.Softmax(1)) puts "0." on net's keys: nothing ran in front of
    the network, so nothing is lost by loading them into it (whylook takes the softmax
    itself)."""
    path = tmp_path / "then_softmax.pt"
    torch.save({f"0.{k}": v for k, v in _state(7).items()}, path)
    run = import_checkpoints([good[0], path, good[1]], data=data, model="smallcnn",
                             device="cpu", out=tmp_path / "run", progress=False)
    assert torch.equal(run.state_dict(1)["block2.conv1.weight"], _state(7)["block2.conv1.weight"])


def _named(good: list[Path], folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir()
    return [Path(shutil.copy(f, folder / n)) for f, n in zip(good, names, strict=True)]


def test_files_numbered_out_of_order_are_refused_beside_an_unnumbered_one(
    good: list[Path], data: str, tmp_path: Path
) -> None:
    files = _named(good, tmp_path / "ckpts", ["init.pt", "epoch_10.pt", "epoch_2.pt"])
    _refused(files, data, tmp_path / "out",
             r"^the checkpoint files are not in the order of the numbers in their names "
             r"\(epoch_10\.pt, epoch_2\.pt; a shell glob sorts 10 before 2\); give them in "
             r"training order .* or confirm this order with --steps \(steps\)$")
    # The unnumbered one first, the rest by number: imported.
    run = import_checkpoints([files[0], files[2], files[1]], data=data, model="smallcnn",
                             device="cpu", out=tmp_path / "run", progress=False)
    assert len(run.checkpoints) == 3


@pytest.mark.parametrize("names", [
    # A metric before the training counter.
    ["acc0.91_step100.pt", "acc0.95_step200.pt", "acc0.93_step300.pt"],
    # The time of day before the date.
    ["ckpt_23h10_2024-01-31.pt", "ckpt_08h05_2024-02-01.pt", "ckpt_14h30_2024-02-01.pt"],
])
def test_names_with_a_counter_after_other_numbers_are_taken_in_order(
    names: list[str], good: list[Path], data: str, tmp_path: Path
) -> None:
    files = _named(good, tmp_path / "ckpts", names)
    run = import_checkpoints(files, data=data, model="smallcnn", device="cpu",
                             out=tmp_path / "run", progress=False)
    assert [Path(r["file"]).name for r in run.manifest["imported"]] == names


def test_a_counter_over_two_numbers_in_glob_order_is_refused() -> None:
    """Epoch, then batch within it: no single number increases over the files, and a shell
    glob still puts epoch 10 before epoch 2."""
    glob = sorted(f"epoch{e}_batch{b}.pt" for e in range(1, 11) for b in (0, 1))
    with pytest.raises(WhylookError, match=r"^the checkpoint files are not in the order"):
        _check_name_order([Path(n) for n in glob])
    by_number = [f"epoch{e}_batch{b}.pt" for e in range(1, 11) for b in (0, 1)]
    _check_name_order([Path(n) for n in by_number])


def test_steps_may_be_any_iterable_of_whole_numbers(
    good: list[Path], data: str, tmp_path: Path
) -> None:
    run = import_checkpoints(good, data=data, model="smallcnn", steps=(s * 50 for s in range(3)),
                             device="cpu", out=tmp_path / "gen", progress=False)
    assert [c.step for c in run.checkpoints] == [0, 50, 100]
    run = import_checkpoints(good, data=data, model="smallcnn",
                             steps=[0, 100.0, np.float64(200.0)], device="cpu",
                             out=tmp_path / "floats", progress=False)
    assert [c.step for c in run.checkpoints] == [0, 100, 200]
    assert all(type(c.step) is int for c in run.checkpoints)
    assert json.loads((tmp_path / "floats" / "run.json").read_text())["config"][
        "total_steps"] == 200
    for i, array in enumerate([np.array([0, 10, 20]), torch.tensor([0, 10, 20]),
                               list(torch.tensor([0, 10, 20]))]):
        run = import_checkpoints(good, data=data, model="smallcnn", steps=array, device="cpu",
                                 out=tmp_path / f"array{i}", progress=False)
        assert [c.step for c in run.checkpoints] == [0, 10, 20]


@pytest.mark.parametrize("steps", [[0, 100.5, 200], [0, "1", 2], [0, True, 2], "012",
                                   [0, float("nan"), 2], [0, float("inf"), 2], 3,
                                   np.array(5), torch.tensor(5),
                                   torch.empty(3, device="meta")])
def test_steps_that_are_not_whole_numbers_are_refused(
    steps: object, good: list[Path], data: str, tmp_path: Path
) -> None:
    with pytest.raises(WhylookError, match=r"^steps must be a list of whole numbers, one per "
                                           r"checkpoint, not "):
        import_checkpoints(good, data=data, model="smallcnn", steps=steps,  # type: ignore[arg-type]
                           device="cpu", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --out


def _unwritable_outs(tmp_path: Path) -> list[tuple[Path, str]]:
    (tmp_path / "afile.txt").write_text("a file")
    cases = [(tmp_path / "afile.txt" / "run",
              r"\(\S*afile\.txt is a file\)")]
    if Path("/proc/self").is_dir():  # a folder nobody, root included, can create folders in
        cases.append((Path("/proc/wlrun"), r"\((FileNotFoundError|PermissionError|OSError): "
                                           r"[^)]+\)|\(/proc is not writable\)"))
    return cases


def test_import_into_an_unwritable_out_is_one_line(
    good: list[Path], data: str, tmp_path: Path
) -> None:
    for out, why in _unwritable_outs(tmp_path):
        _refused(good, data, out,
                 rf"^cannot create the run folder {out} {why}; choose a folder you can write "
                 "with --out$")


def test_train_into_an_unwritable_out_is_one_line(data: str, tmp_path: Path) -> None:
    for out, why in _unwritable_outs(tmp_path):
        with pytest.raises(WhylookError, match=rf"^cannot create the run folder {out} {why}; "
                                               "choose a folder you can write with --out$"):
            train(data, "smallcnn", epochs=1, checkpoints=3, batch_size=30, device="cpu",
                  out=out, progress=False)
        assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_one_line(good: list[Path], data: str, tmp_path: Path
                                               ) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _refused(good, data, locked / "run",
                 rf"^cannot create the run folder {locked / 'run'} \({locked} is not writable\)")
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- run folders


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def _edit(path: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    manifest = json.loads((path / "run.json").read_text())
    edit(manifest)
    (path / "run.json").write_text(json.dumps(manifest))
    return path


def _opening_fails(path: Path, match: str) -> str:
    with pytest.raises(WhylookError, match=match) as info:
        RunFolder.open(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_run_json_steps_must_increase(run: Path, tmp_path: Path) -> None:
    path = _edit(_copy(run, tmp_path), lambda m: m["checkpoints"][1].update(step=100))
    _opening_fails(path, rf"^{path}/run\.json is malformed \(checkpoint steps \[0, 100, 9\] are "
                         r"not >= 0 and strictly increasing\); re-create the run$")
    _edit(path, lambda m: m["checkpoints"][1].update(step=9))
    _opening_fails(path, r"steps \[0, 9, 9\] are not")
    _edit(path, lambda m: [c.update(step=c["step"] - 5) for c in m["checkpoints"]])
    _opening_fails(path, r"steps \[-5, 4, 4\] are not >= 0")


@pytest.mark.parametrize("limit", ["x", 0, -3, 2.5, True, [4]])
def test_run_json_data_limit_must_be_a_count_or_null(
    limit: object, run: Path, tmp_path: Path
) -> None:
    path = _edit(_copy(run, tmp_path),
                 lambda m: m["config"].update(data_limit_per_class=limit))
    _opening_fails(path, rf"^{path}/run\.json is malformed \(config\.data_limit_per_class is "
                         rf"{limit!r}, not a whole number >= 1 or null\); re-create the run$"
                   .replace("[", r"\[").replace("]", r"\]"))


def test_run_json_data_limit_may_be_a_count(run: Path, tmp_path: Path) -> None:
    path = _edit(_copy(run, tmp_path), lambda m: m["config"].update(data_limit_per_class=5))
    assert RunFolder.open(path).config["data_limit_per_class"] == 5


def test_a_file_is_not_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "api1.py"
    path.write_text("print('not a run')\n")
    message = (f"{path} is a file, not a run folder; give the folder that 'whylook train' or "
               "'whylook import' created")
    for check in (RunFolder.open, require_run_folder):
        with pytest.raises(WhylookError) as info:
            check(path)
        assert str(info.value) == message
    assert main(["explain", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


def test_require_run_folder_says_what_is_wrong(run: Path, tmp_path: Path) -> None:
    assert require_run_folder(run) == run
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(WhylookError, match=rf"^run folder {killed} is incomplete \(its training "
                                           r"or import stopped before the end\); run that"):
        require_run_folder(killed)
    (killed / INCOMPLETE_MARKER).unlink()
    with pytest.raises(WhylookError, match=r"is not a whylook run folder \(no run\.json\)"):
        require_run_folder(killed)
    with pytest.raises(WhylookError, match=rf"^run folder {tmp_path / 'none'} does not exist$"):
        require_run_folder(tmp_path / "none")
