"""Untrusted inputs: checkpoints and archives from the internet never run code, never write
outside their place, and never expand without bound.

Covered elsewhere, not repeated here: the loader-level zip-slip test (five kinds of unsafe
member path, refused before any member is opened) and the zip-bomb test by declared size
are in ``tests/test_data.py`` (``test_zip_slip_is_refused_before_reading``,
``test_zip_bomb_is_refused_before_reading``), as is the npz with pickled object arrays
(``test_npz_with_pickled_objects_is_refused``); a run.json that points a checkpoint outside
its folder is in ``tests/test_run.py`` (``test_broken_run_folders_are_one_line_errors``).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

import whylook
from _tiny_run import baseline, copy_run, lying_zip, png, tree_zip
from whylook import _io
from whylook.cli import main
from whylook.data import MAX_ZIP_BYTES, load_data
from whylook.errors import WhylookError

# The package under test, as imported (the checkout's src/ in an editable install).
SRC = Path(whylook.__file__).resolve().parent


class _Exploit:
    """Unpickling this object calls ``open(path, "w")``: it creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def _crafted(path: Path, canary: Path, kind: str) -> Path:
    """A checkpoint whose unpickling would create ``canary``, in one of three formats."""
    payload = {"weight": torch.zeros(2), "hook": _Exploit(canary)}
    if kind == "torch-zip":
        torch.save(payload, path)
    elif kind == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as some tools write them
        path.write_bytes(pickle.dumps(payload))
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("kind", ["torch-zip", "torch-legacy", "bare-pickle"])
def test_a_crafted_pickle_checkpoint_never_runs(
    kind: str, tmp_path: Path, tmp_path_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    data, reference = baseline(tmp_path_factory)
    canary = tmp_path / "pwned.txt"
    evil = _crafted(tmp_path / "evil.pt", canary, kind)
    good = [str(reference / "checkpoints" / f"ckpt-000{i}.safetensors") for i in (0, 3)]

    out = tmp_path / "imported"
    code = main(["import", good[0], str(evil), good[1], "--data", f"npz:{data}",
                 "--out", str(out)])
    assert code == 2
    line = _one_error_line(capsys)
    assert f"checkpoint {evil} cannot be loaded safely" in line
    # The message says how to convert a checkpoint the user trusts.
    assert "if you trust it, convert it once with" in line
    assert "safetensors" in line
    assert not canary.exists()
    assert not out.exists()
    with pytest.raises(WhylookError, match="cannot be loaded safely"):
        _io.load_weights(evil)
    assert not canary.exists()
    # The file really is armed: unpickling it without whylook's guard runs the payload.
    torch.load(evil, weights_only=False) if kind != "bare-pickle" else pickle.loads(
        evil.read_bytes()
    )
    assert canary.exists()


def test_the_suggested_conversion_works_on_a_trusted_pickle(tmp_path: Path) -> None:
    """The refusal tells the user how to convert a checkpoint they trust; that advice must
    work on the usual pickles: a whole model, and a training-state dict around it."""
    from whylook.models import build_model

    model = build_model("smallcnn", num_classes=3, in_channels=1, image_size=16)
    code = re.fullmatch(r'python -c "(.*)"', _io.CONVERT_COMMAND)
    assert code
    for name, obj in (("model.pt", model), ("state.ckpt", {"state_dict": model.state_dict(),
                                                           "epoch": 3, "opt": object})):
        src, dst = tmp_path / name, tmp_path / f"{name}.safetensors"
        torch.save(obj, src)
        with pytest.raises(WhylookError, match="cannot be loaded safely"):
            _io.load_weights(src)
        exec(code[1].replace("IN.pt", str(src)).replace("OUT.safetensors", str(dst)), {})
        converted = _io.load_weights(dst)
        expected = model.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_a_crafted_pickle_inside_a_run_folder_never_runs(
    tmp_path: Path, tmp_path_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    """A downloaded run folder whose run.json names a pickle as its final checkpoint:
    every command that loads checkpoints refuses it."""
    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run", analysis=True)
    canary = tmp_path / "pwned.txt"
    _crafted(run / "checkpoints" / "final.pt", canary, "torch-zip")
    manifest = json.loads((run / "run.json").read_text())
    manifest["checkpoints"][-1]["file"] = "checkpoints/final.pt"
    (run / "run.json").write_text(json.dumps(manifest))
    for argv in (
        ["explain", str(run), "--device", "cpu"],
        ["finetune", str(run), "--seeds", "1", "--strategies", "full", "--device", "cpu"],
        ["compare", str(run), str(reference), "--out", str(tmp_path / "c.json")],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert "final.pt cannot be loaded safely" in _one_error_line(capsys)
        assert not canary.exists()


def test_a_pickle_renamed_to_safetensors_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "pwned.txt"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"hook": _Exploit(canary)}))
    with pytest.raises(WhylookError, match="not a readable safetensors file") as info:
        _io.load_weights(path)
    assert "\n" not in str(info.value)
    assert not canary.exists()


def test_a_safetensors_header_that_claims_petabytes_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 50) + b'{"a": 1}')
    tracemalloc.start()
    try:
        with pytest.raises(WhylookError, match="not a readable safetensors file"):
            _io.load_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


def test_the_source_never_unpickles_or_extracts() -> None:
    """A static guard: every torch.load passes weights_only=True, nothing enables numpy's
    pickles, and no archive is extracted to disk (data.py reads zips in memory)."""
    problems = []
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve"}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            # Under another name (import pickle as pk; from torch import load) the calls
            # below would go unseen: no module that unpickles is imported at all, and
            # torch's load only as torch.load.
            if isinstance(node, ast.Import | ast.ImportFrom):
                where = f"{path.relative_to(SRC)}:{node.lineno}"
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""])
                if any(m.split(".")[0] in unpicklers for m in modules):
                    problems.append(f"{where}: imports {', '.join(modules)}")
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                        "torch") and any(a.name == "load" for a in node.names):
                    problems.append(f"{where}: from {node.module} import load")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            # The root of a dotted owner: torch.serialization.load is torch's load too.
            root = func.value if isinstance(func, ast.Attribute) else None
            while isinstance(root, ast.Attribute):
                root = root.value
            owner = root.id if isinstance(root, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in {"pickle", "cPickle", "dill", "joblib", "marshal"} and name in {
                "load", "loads", "Unpickler"
            }:
                problems.append(f"{where}: {owner}.{name}")
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{where}: allow_pickle is not False")
            if name in {"extractall", "extract", "unpack_archive"}:
                problems.append(f"{where}: {name} writes archive members to disk")
    assert problems == []


# ----------------------------------------------------------------------------- archives


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("member", ["../../escaped.png", "/tmp/whylook-escaped.png"])
def test_train_on_a_zip_slip_archive_writes_nothing(
    member: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tree_zip(tmp_path / "data" / "evil.zip", {member: png(7)})
    before = _files(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--data", f"folder:{archive}", "--device", "cpu", "--out", str(out)]) == 2
    assert "unsafe member path" in _one_error_line(capsys)
    assert _files(tmp_path) == before
    assert not Path("/tmp/whylook-escaped.png").exists()


def test_a_zip_bomb_that_lies_about_its_size_is_refused_with_bounded_memory(
    tmp_path: Path,
) -> None:
    """The declared sizes pass the size guard, but a member never yields more than it
    declares: reading stops there and the CRC check fails, with memory kept small."""
    archive = lying_zip(tmp_path / "liar.zip", real_size=64 << 20, declared=1000)
    assert archive.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(WhylookError, match="unreadable") as info:
            load_data(f"folder:{archive}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert peak < 32 << 20, f"peak {peak / 1e6:.0f} MB"


def test_the_zip_bomb_limit_is_stated() -> None:
    assert MAX_ZIP_BYTES == 2 * 1024**3
    doc = (Path(__file__).resolve().parents[1] / "docs" / "BAD-INPUTS.md").read_text()
    assert "2 GiB" in doc


def test_a_run_folder_naming_model_code_imports_it_only_when_trusted(
    tmp_path: Path, tmp_path_factory, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run.json may name a ``module:factory``; building the model imports that module, which
    runs its code. A run folder from elsewhere must not make whylook do that unasked."""
    from whylook.models import TRUST_ENV

    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run", analysis=True)
    before = (run / "analysis" / "explanation.json").read_bytes()
    canary = tmp_path / "imported.txt"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "whylook_probe_model.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(canary)!r}).write_text('imported')\n"
        "from whylook.models import build_model\n"
        "def build(num_classes, in_channels, image_size):\n"
        "    return build_model('smallcnn', num_classes=num_classes, in_channels=in_channels,\n"
        "                       image_size=image_size)\n"
    )
    monkeypatch.syspath_prepend(str(modules))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    manifest = json.loads((run / "run.json").read_text())
    manifest["config"]["model"] = "whylook_probe_model:build"
    (run / "run.json").write_text(json.dumps(manifest))
    twin = copy_run(run, tmp_path / "twin", analysis=True)
    explain = ["explain", str(run), "--k", "5", "--analysis-size", "60", "--device", "cpu"]

    for argv in (
        explain,
        ["finetune", str(run), "--seeds", "1", "--strategies", "full", "--device", "cpu"],
        ["compare", str(twin), str(run), "--out", str(tmp_path / "c.json")],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        line = _one_error_line(capsys)
        assert "importing 'whylook_probe_model' runs its code" in line
        assert "--trust-model-code whylook_probe_model" in line
        assert not canary.exists()
    assert (run / "analysis" / "explanation.json").read_bytes() == before

    # Trusted by the flag (or the variable it sets), the module is imported and used.
    assert main([*explain, "--trust-model-code", "whylook_probe_model"]) == 0
    assert canary.read_text() == "imported"
    assert json.loads((run / "analysis" / "explanation.json").read_text())["k"] == 5
    assert "whylook_probe_model" in os.environ[TRUST_ENV].split(",")


def test_trust_covers_subpackages_and_an_imported_module() -> None:
    import sys

    from whylook.models import TRUST_ENV, require_trusted_factory

    with pytest.MonkeyPatch.context() as mp:
        mp.delitem(sys.modules, "whylook_not_imported", raising=False)
        mp.setenv(TRUST_ENV, "")
        with pytest.raises(WhylookError, match=r"--trust-model-code pkg\.sub\.mod"):
            require_trusted_factory("pkg.sub.mod:f", "run r")
        mp.setenv(TRUST_ENV, "other, pkg")
        require_trusted_factory("pkg.sub.mod:f", "run r")
        with pytest.raises(WhylookError):
            require_trusted_factory("pkgx.mod:f", "run r")  # a prefix of a name is not a package
        mp.setenv(TRUST_ENV, "*")
        require_trusted_factory("anything:f", "run r")
    require_trusted_factory("json:loads", "run r")  # json is imported: its code already ran
