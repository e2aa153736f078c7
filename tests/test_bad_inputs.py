"""Every row of docs/BAD-INPUTS.md, tested: the doc is the source of the expected messages.

Each row of the doc's tables has an id, the command it goes through and an excerpt of the
message. ``CASES`` below builds that bad input for each id. The tests check that the doc
and ``CASES`` have the same ids and commands (so neither can drift from the other), and
that each bad input gives exactly the documented message: through the CLI, one line
``error: ...`` on stderr and exit status 2; through the API, a one-line WhylookError.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _tiny_run import (
    EXPLAIN_ARGS,
    TRAIN_ARGS,
    USER_MODELS,
    baseline,
    copy_run,
    lying_zip,
    png,
    tree_zip,
    write_tiny_npz,
)
from whylook import data as data_mod
from whylook._io import run_lock
from whylook.cli import main
from whylook.data import load_data
from whylook.errors import WhylookError
from whylook.explain import ExplainSettings, explain
from whylook.models import build_model
from whylook.run import INCOMPLETE_MARKER
from whylook.structure import StructureSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "BAD-INPUTS.md"
ROW = re.compile(r"^\|\s*`(?P<id>[a-z0-9-]+)`\s*\|(?P<cells>.*)\|\s*$")


def doc_rows() -> dict[str, tuple[str, str]]:
    """{id: (command, message excerpt)} from the doc's tables."""
    rows: dict[str, tuple[str, str]] = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if not match:
            continue
        cells = [c.strip() for c in match["cells"].split(" | ")]
        assert len(cells) == 3, f"row {match['id']} needs 4 cells: {line}"
        command, message = cells[1].strip("`"), cells[2]
        excerpt = re.fullmatch(r"`(.+)`", message)
        assert excerpt, f"row {match['id']}: the message excerpt must be one `code` span"
        assert match["id"] not in rows, f"row {match['id']} appears twice"
        rows[match["id"]] = (command, excerpt[1])
    return rows


@dataclass
class Ctx:
    tmp: Path
    data: Path  # the tiny npz
    reference: Path  # the tiny run, trained and explained (read-only)
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def npz(self, **overrides: np.ndarray | None) -> str:
        return f"npz:{write_tiny_npz(self.tmp / 'bad.npz', **overrides)}"

    def train(self, spec: str, *extra: str) -> list[str]:
        return ["train", "--data", spec, *TRAIN_ARGS, *extra, "--out", str(self.out)]

    def run(self, *, analysis: bool = False) -> Path:
        return copy_run(self.reference, self.tmp / "run", analysis=analysis)

    def explain(self, run: Path, *extra: str) -> list[str]:
        return ["explain", str(run), *EXPLAIN_ARGS, *extra]

    def edit_manifest(self, run: Path, edit: Callable[[dict], object]) -> Path:
        manifest = json.loads((run / "run.json").read_text())
        edit(manifest)
        (run / "run.json").write_text(json.dumps(manifest))
        return run

    def checkpoint(self, name: str, classes: int = 3) -> Path:
        torch.manual_seed(0)
        model = build_model("smallcnn", num_classes=classes, in_channels=1, image_size=16)
        path = self.tmp / name
        if path.suffix == ".safetensors":
            save_file(model.state_dict(), str(path))
        else:
            torch.save(model.state_dict(), path)
        return path

    def good_checkpoints(self) -> list[str]:
        return [str(self.reference / "checkpoints" / f"ckpt-000{i}.safetensors")
                for i in (0, 1, 3)]

    def folder(self, build: Callable[[Path], object]) -> str:
        root = self.tmp / "tree"
        for split in ("train", "test"):
            for c in ("a", "b"):
                (root / split / c).mkdir(parents=True)
                for i in range(2):
                    (root / split / c / f"{i}.png").write_bytes(png(60 * i + 20))
        build(root)
        return f"folder:{root}"


# A case returns CLI arguments (for `whylook ...` rows) or a callable (for API rows).
Case = tuple[str, Callable[[Ctx], "list[str] | Callable[[], object]"]]


def _exploit_checkpoint(c: Ctx) -> list[str]:
    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(c.tmp / "pwned"), "w"))

    torch.save({"w": torch.zeros(1), "x": Exploit()}, c.tmp / "evil.pt")
    return ["import", str(c.tmp / "evil.pt"), *c.good_checkpoints(), "--out", str(c.out)]


def _whole_model(c: Ctx) -> list[str]:
    torch.save(build_model("smallcnn", num_classes=3, in_channels=1, image_size=16),
               c.tmp / "model.pt")
    return ["import", str(c.tmp / "model.pt"), *c.good_checkpoints(), "--out", str(c.out)]


def _not_state_dict(c: Ctx) -> list[str]:
    torch.save({"weights": "not tensors"}, c.tmp / "odd.pt")
    return ["import", str(c.tmp / "odd.pt"), *c.good_checkpoints(), "--out", str(c.out)]


def _several_state_dicts(c: Ctx) -> list[str]:
    state = build_model("smallcnn", num_classes=3, in_channels=1, image_size=16).state_dict()
    torch.save({"model": state, "ema": state, "epoch": 1}, c.tmp / "train-state.pt")
    return ["import", str(c.tmp / "train-state.pt"), *c.good_checkpoints(), "--out", str(c.out)]


def _corrupt_safetensors(c: Ctx) -> list[str]:
    (c.tmp / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return ["import", str(c.tmp / "bad.safetensors"), *c.good_checkpoints(),
            "--out", str(c.out)]


def _import(c: Ctx, *extra: str) -> list[str]:
    return ["import", *c.good_checkpoints(), "--data", f"npz:{c.data}", *extra,
            "--out", str(c.out)]


def _run_with_foreign_final(c: Ctx) -> list[str]:
    run = c.run()
    five = c.checkpoint("five.safetensors", classes=5)
    shutil.copy(five, run / "checkpoints" / "ckpt-0003.safetensors")
    return c.explain(run)


def _run_with_diverged_checkpoint(c: Ctx) -> list[str]:
    from safetensors.torch import load_file

    run = c.run()
    path = run / "checkpoints" / "ckpt-0001.safetensors"
    weights = load_file(path)
    weights["classifier.fc2.weight"][0, 0] = float("nan")
    save_file(weights, path)
    return c.explain(run)


def _report_into_a_file(c: Ctx) -> list[str]:
    (c.tmp / "a-file").write_text("not a folder")
    return ["report", str(c.run(analysis=True)), "--out", str(c.tmp / "a-file" / "report")]


def _two_checkpoint_run(c: Ctx) -> list[str]:
    run = c.run()
    return c.explain(c.edit_manifest(run, lambda m: m.update(checkpoints=m["checkpoints"][:2])))


def _changed_data(c: Ctx) -> list[str]:
    data = write_tiny_npz(c.tmp / "data.npz")
    run = c.run()
    c.edit_manifest(run, lambda m: m["config"].update(data=f"npz:{data}"))
    c.edit_manifest(run, lambda m: m["data"].update(spec=f"npz:{data}"))
    x = np.load(data)["x_train"].copy()
    x[0, 0, 0] ^= 1
    write_tiny_npz(data, x_train=x)
    return c.explain(run)


def _incomplete(c: Ctx) -> list[str]:
    (c.tmp / "killed" / "checkpoints").mkdir(parents=True)
    (c.tmp / "killed" / INCOMPLETE_MARKER).write_text("")
    return c.explain(c.tmp / "killed")


def _busy(c: Ctx) -> Callable[[], object]:
    run = c.run()

    def call() -> int:
        with run_lock(run):
            return main(c.explain(run))

    return call


def _file(c: Ctx, name: str, content: bytes = b"x") -> Path:
    (c.tmp / name).write_bytes(content)
    return c.tmp / name


def _run_checkpoint_missing(c: Ctx) -> list[str]:
    run = c.run()
    (run / "checkpoints" / "ckpt-0001.safetensors").unlink()
    return c.explain(run)


def _run_json_corrupt(c: Ctx) -> list[str]:
    run = c.run()
    (run / "run.json").write_text('{"schema": "whylook.run/1", "conf')
    return c.explain(run)


def _out_not_empty(c: Ctx) -> list[str]:
    c.out.mkdir()
    (c.out / "notes.txt").write_text("mine")
    return c.train(f"npz:{c.data}")


def _analysis(c: Ctx, damage: Callable[[Path], object]) -> list[str]:
    run = c.run(analysis=True)
    damage(run / "analysis")
    return ["report", str(run)]


def _compare_out_under_a_file(c: Ctx) -> list[str]:
    run = c.run(analysis=True)
    (c.tmp / "afile.txt").write_text("")
    return ["compare", str(run), str(run), "--out", str(c.tmp / "afile.txt" / "x.json")]


def _explain_api(c: Ctx, **settings: object) -> Callable[[], object]:
    run = c.run()
    return lambda: explain(run, device="cpu", settings=ExplainSettings(**settings))


def _small_images(c: Ctx, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (60, size, size), dtype=np.uint8),
        "x_test": rng.integers(0, 256, (24, size, size), dtype=np.uint8),
    }


def _empty_npz(c: Ctx) -> list[str]:
    return c.train(f"npz:{_file(c, 'empty.npz', b'')}")


def _npy_as_npz(c: Ctx) -> list[str]:
    np.save(c.tmp / "x_train.npy", np.zeros((60, 16, 16), np.uint8))
    return c.train(f"npz:{c.tmp / 'x_train.npy'}")


# A user's model factories, in a module the test puts on sys.path (the CLI runs in-process);
# the test takes the module out of sys.modules again.
USER_MODULE = "bad_input_models"


def _user_model(c: Ctx, factory: str) -> list[str]:
    (c.tmp / f"{USER_MODULE}.py").write_text(USER_MODELS)
    c.monkeypatch.syspath_prepend(str(c.tmp))
    return c.train(f"npz:{c.data}", "--model", f"{USER_MODULE}:{factory}")


def _import_with(c: Ctx, name: str, edit: Callable[[dict[str, torch.Tensor]], object]
                 ) -> list[str]:
    """`whylook import` of the reference run's checkpoints 0, 1 and 3, then a copy of
    checkpoint 3 changed by ``edit`` (saved as ``name``: .pt or .safetensors)."""
    from safetensors.torch import load_file

    good = c.good_checkpoints()
    weights = load_file(good[-1])
    edit(weights)
    path = c.tmp / name
    if path.suffix == ".safetensors":
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    return ["import", *good, str(path), "--data", f"npz:{c.data}", "--out", str(c.out)]


def _fc2(weights: dict[str, torch.Tensor], value: torch.Tensor) -> None:
    weights["classifier.fc2.weight"] = value


def _broken_link(root: Path) -> None:
    os.symlink("missing.png", root / "train" / "a" / "x.png")


Y = np.arange(60) % 3  # the tiny set's training labels

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ paths
    "data-path-missing": ("whylook train", lambda c: c.train("npz:/no/such/data.npz")),
    "data-spec-unknown": ("whylook train", lambda c: c.train("mnist")),
    "out-not-empty": ("whylook train", _out_not_empty),
    "out-is-a-file": (
        "whylook train",
        lambda c: [*c.train(f"npz:{c.data}")[:-1], str(_file(c, "taken"))],
    ),
    "out-holds-a-run": (
        "whylook train",
        lambda c: [*c.train(f"npz:{c.data}")[:-1], str(c.run())],
    ),
    "out-under-a-file": (
        "whylook train",
        lambda c: [*c.train(f"npz:{c.data}")[:-1], str(_file(c, "taken") / "run")],
    ),
    "run-missing": ("whylook explain", lambda c: c.explain(c.tmp / "nowhere")),
    "run-not-a-run": ("whylook explain", lambda c: c.explain(c.tmp)),
    "run-is-a-file": ("whylook explain", lambda c: c.explain(_file(c, "run.json", b"{}"))),
    "run-incomplete": ("whylook explain", _incomplete),
    "checkpoint-file-missing": (
        "whylook import",
        lambda c: ["import", *(str(c.tmp / f"{n}.pt") for n in "abc"), "--out", str(c.out)],
    ),
    "checkpoint-unknown-extension": (
        "whylook import",
        lambda c: ["import", *(str(_file(c, f"{n}.h5")) for n in "abc"), "--out", str(c.out)],
    ),
    "run-checkpoint-missing": ("whylook explain", _run_checkpoint_missing),
    "run-checkpoint-outside": (
        "whylook explain",
        lambda c: c.explain(c.edit_manifest(
            c.run(), lambda m: m["checkpoints"][1].update(file="../elsewhere.safetensors"))),
    ),
    # ------------------------------------------------------------------ archives
    "zip-slip": (
        "whylook train",
        lambda c: c.train(f"folder:{tree_zip(c.tmp / 'slip.zip', {'../evil.png': png(1)})}"),
    ),
    "zip-bomb": (
        "whylook train",
        lambda c: (
            c.monkeypatch.setattr(data_mod, "MAX_ZIP_BYTES", 1000),
            c.train(f"folder:{tree_zip(c.tmp / 'big.zip', {'train/a/big.png': bytes(5000)})}"),
        )[1],
    ),
    "zip-bomb-lying-size": (
        "whylook train",
        lambda c: c.train(f"folder:{lying_zip(c.tmp / 'liar.zip', 1 << 20, 100)}"),
    ),
    "not-a-zip": ("whylook train", lambda c: c.train(f"folder:{_file(c, 'data.txt')}")),
    # ------------------------------------------------------------------ checkpoints
    "checkpoint-pickle-code": ("whylook import", _exploit_checkpoint),
    "checkpoint-whole-model": ("whylook import", _whole_model),
    "checkpoint-not-a-state-dict": ("whylook import", _not_state_dict),
    "checkpoint-several-state-dicts": ("whylook import", _several_state_dicts),
    "checkpoint-corrupt-safetensors": ("whylook import", _corrupt_safetensors),
    "checkpoint-does-not-fit": (
        "whylook import",
        lambda c: ["import", str(c.checkpoint("five.pt", classes=5)),
                   *c.good_checkpoints(), "--data", f"npz:{c.data}", "--out", str(c.out)],
    ),
    "run-checkpoint-does-not-fit": ("whylook explain", _run_with_foreign_final),
    "run-checkpoint-diverged": ("whylook explain", _run_with_diverged_checkpoint),
    "import-one-checkpoint": (
        "whylook import",
        lambda c: ["import", c.good_checkpoints()[0], "--out", str(c.out)],
    ),
    "import-steps-not-increasing": ("whylook import", lambda c: _import(c, "--steps", "0,5,5")),
    "import-steps-not-numbers": ("whylook import", lambda c: _import(c, "--steps", "0,last")),
    "import-steps-count": ("whylook import", lambda c: _import(c, "--steps", "0")),
    "import-same-checkpoint-twice": (
        "whylook import",
        lambda c: ["import", c.good_checkpoints()[0], *c.good_checkpoints(),
                   "--data", f"npz:{c.data}", "--out", str(c.out)],
    ),
    "checkpoint-not-floating-point": (
        "whylook import",
        lambda c: _import_with(c, "int.safetensors", lambda w: _fc2(
            w, w["classifier.fc2.weight"].round().to(torch.int32))),
    ),
    "checkpoint-nan-weights": (
        "whylook import",
        lambda c: _import_with(c, "nan.safetensors", lambda w: w["classifier.fc2.weight"]
                               .__setitem__((0, 0), float("nan"))),
    ),
    "checkpoint-sparse": (
        "whylook import",
        lambda c: _import_with(c, "sparse.pt", lambda w: _fc2(
            w, w["classifier.fc2.weight"].to_sparse())),
    ),
    # ------------------------------------------------------------------ shapes
    "images-without-pixel-axes": (
        "whylook train", lambda c: c.train(c.npz(x_train=np.zeros((60, 16), np.uint8)))
    ),
    "images-two-channels": (
        "whylook train", lambda c: c.train(c.npz(x_train=np.zeros((60, 16, 16, 2), np.uint8)))
    ),
    "images-labels-count": ("whylook train", lambda c: c.train(c.npz(y_train=Y[:50]))),
    "split-shapes-differ": (
        "whylook train", lambda c: c.train(c.npz(x_test=np.zeros((24, 12, 12), np.uint8)))
    ),
    "labels-one-hot": ("whylook train", lambda c: c.train(c.npz(y_train=np.eye(3)[Y]))),
    "images-too-small": (
        "whylook train",
        lambda c: c.train(c.npz(**_small_images(c, 6))),
    ),
    "folder-image-sizes-differ": (
        "whylook train",
        lambda c: c.train(c.folder(lambda r: (r / "test" / "a" / "big.png").write_bytes(
            png(9, size=20)))),
    ),
    # ------------------------------------------------------------------ dtypes
    "pickled-object-arrays": (
        "whylook train",
        lambda c: c.train(c.npz(y_train=np.array([object()] * 60, dtype=object))),
    ),
    "npz-empty-file": ("whylook train", _empty_npz),
    "npz-single-npy": ("whylook train", _npy_as_npz),
    "images-not-numbers": (
        "whylook train", lambda c: c.train(c.npz(x_train=np.full((60, 16, 16), "a")))
    ),
    "labels-fractional": ("whylook train", lambda c: c.train(c.npz(y_train=Y + 0.5))),
    "labels-not-numbers": (
        "whylook train", lambda c: c.train(c.npz(y_train=np.array(["bar"] * 60)))
    ),
    "pixels-int-out-of-range": (
        "whylook train",
        lambda c: c.train(c.npz(x_train=np.full((60, 16, 16), 256, np.int16))),
    ),
    "pixels-float-out-of-range": (
        "whylook train",
        lambda c: c.train(c.npz(x_train=np.full((60, 16, 16), -0.5))),
    ),
    "image-undecodable": (
        "whylook train",
        lambda c: c.train(c.folder(lambda r: (r / "train" / "a" / "x.png").write_bytes(b"PNG?"))),
    ),
    "image-broken-link": ("whylook train", lambda c: c.train(c.folder(_broken_link))),
    # ------------------------------------------------------------------ NaN / inf
    "pixels-nan": (
        "whylook train", lambda c: c.train(c.npz(x_train=np.full((60, 16, 16), np.nan)))
    ),
    "pixels-inf": (
        "whylook train",
        lambda c: c.train(c.npz(x_test=np.full((24, 16, 16), np.inf, np.float32))),
    ),
    "labels-nan": (
        "whylook train", lambda c: c.train(c.npz(y_train=np.where(Y == 1, np.nan, Y)))
    ),
    # ------------------------------------------------------------------ classes
    "single-class": (
        "whylook train",
        lambda c: c.train(c.npz(y_train=0 * Y, y_test=np.zeros(24, int), classes=None)),
    ),
    "empty-class": ("whylook train", lambda c: c.train(c.npz(y_train=np.where(Y == 1, 0, Y)))),
    "training-one-class": ("whylook train", lambda c: c.train(c.npz(y_train=0 * Y))),
    "labels-from-one": (
        "whylook train",
        lambda c: c.train(c.npz(y_train=Y + 1, y_test=np.arange(24) % 3 + 1, classes=None)),
    ),
    "empty-test-split": (
        "whylook train",
        lambda c: c.train(c.npz(x_test=np.zeros((0, 16, 16), np.uint8), y_test=np.zeros(0, int))),
    ),
    "duplicate-class-names": (
        "whylook train", lambda c: c.train(c.npz(classes=np.array(["bar", "ring", "bar"])))
    ),
    "folder-one-class": (
        "whylook train",
        lambda c: c.train(c.folder(lambda r: [shutil.rmtree(r / s / "b") for s in ("train",
                                                                               "test")])),
    ),
    "folder-no-images": (
        "whylook train",
        lambda c: c.train(c.folder(lambda r: [p.unlink() for p in r.rglob("*.png")])),
    ),
    # ------------------------------------------------------------------ labels
    "label-out-of-range": (
        "whylook train", lambda c: c.train(c.npz(y_test=np.arange(24) % 3 + (np.arange(24) == 5)
                                                 * 4))
    ),
    "label-far-out-of-range": (
        "whylook train",
        lambda c: c.train(c.npz(y_test=np.where(np.arange(24) == 3, 1e9, np.arange(24) % 3),
                                classes=None)),
    ),
    "label-negative": ("whylook train", lambda c: c.train(c.npz(y_train=Y - (Y == 2) * 3))),
    # ------------------------------------------------------------------ K, sizes, options
    "k-below-2": ("whylook explain", lambda c: c.explain(c.run(), "--k", "1")),
    "k-not-a-number": ("whylook explain", lambda c: c.explain(c.run(), "--k", "many")),
    "k-above-feature-vectors": ("whylook explain", lambda c: c.explain(c.run(), "--k", "5000")),
    "analysis-size-zero": (
        "whylook explain", lambda c: c.explain(c.run(), "--analysis-size", "0")
    ),
    "analysis-size-too-large": (
        "whylook explain", lambda c: c.explain(c.run(), "--analysis-size", "61")
    ),
    "analysis-set-misses-a-class": (
        "whylook explain", lambda c: c.explain(c.run(), "--analysis-size", "2")
    ),
    "prototype-size-too-large": (
        "whylook explain", lambda c: c.explain(c.run(), "--prototype-size", "1000")
    ),
    "seed-negative": ("whylook explain", lambda c: c.explain(c.run(), "--seed", "-1")),
    "seed-beyond-32-bits": (
        "whylook explain", lambda c: c.explain(c.run(), "--seed", str(2**32))
    ),
    "train-seed-beyond-32-bits": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--seed", str(2**32))
    ),
    "train-data-seed-negative": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--data-seed", "-1")
    ),
    "limit-per-class-fractional": (
        "load_data()", lambda c: lambda: load_data(f"npz:{c.data}", limit_per_class=2.5)
    ),
    "structure-threshold-nan": (
        "explain()", lambda c: lambda: StructureSettings(z_threshold=float("nan"))
    ),
    "too-few-checkpoints": ("whylook explain", _two_checkpoint_run),
    "layer-unknown": ("whylook explain", lambda c: c.explain(c.run(), "--layer", "block9")),
    "layer-without-spatial-map": (
        "whylook explain", lambda c: c.explain(c.run(), "--layer", "classifier.fc1")
    ),
    "layer-map-below-2x2": (
        "whylook train",
        lambda c: c.train(c.npz(**_small_images(c, 12)), "--layer", "pool"),
    ),
    "support-unknown": ("whylook explain", lambda c: c.explain(c.run(), "--support", "local")),
    "shard-size-zero": ("explain()", lambda c: _explain_api(c, shard_size=0)),
    "bootstrap-one": ("explain()", lambda c: _explain_api(c, bootstrap=1)),
    "standard-errors-unknown": (
        "whylook explain", lambda c: c.explain(c.run(), "--standard-errors", "exact")
    ),
    "precision-unknown": (
        "whylook explain", lambda c: c.explain(c.run(), "--precision", "float16")
    ),
    "uncertain-null-negative": (
        "whylook explain", lambda c: c.explain(c.run(), "--uncertain-null", "-1")
    ),
    "ridge-lambda-negative": ("explain()", lambda c: _explain_api(c, ridge_lambda=-1.0)),
    "min-cluster-size-one": ("explain()", lambda c: _explain_api(c, min_cluster_size=1)),
    "train-too-many-checkpoints": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--checkpoints", "9")
    ),
    "train-two-checkpoints": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--checkpoints", "2")
    ),
    "train-epochs-zero": ("whylook train", lambda c: c.train(f"npz:{c.data}", "--epochs", "0")),
    "train-batch-size-zero": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--batch-size", "0")
    ),
    "train-lr-not-positive": ("whylook train", lambda c: c.train(f"npz:{c.data}", "--lr", "nan")),
    "finetune-lr-not-positive": (
        "whylook finetune", lambda c: ["finetune", str(c.run(analysis=True)), "--lr", "0"]
    ),
    "finetune-seeds-zero": (
        "whylook finetune", lambda c: ["finetune", str(c.run(analysis=True)), "--seeds", "0"]
    ),
    "compare-out-under-a-file": ("whylook compare", _compare_out_under_a_file),
    "model-unknown": ("whylook train", lambda c: c.train(f"npz:{c.data}", "--model", "resnet51")),
    "model-wrong-logits": ("whylook train", lambda c: _user_model(c, "wrong_classes")),
    "model-returns-tuple": ("whylook train", lambda c: _user_model(c, "tuple_out")),
    "model-factory-raises": ("whylook train", lambda c: _user_model(c, "raises")),
    "model-without-parameters": ("whylook train", lambda c: _user_model(c, "no_params")),
    "model-frozen": ("whylook train", lambda c: _user_model(c, "frozen")),
    "model-name-relative": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--model", ".rel:f")
    ),
    "device-cuda-without-gpu": (
        "whylook train", lambda c: c.train(f"npz:{c.data}", "--device", "cuda")
    ),
    # ------------------------------------------------------------------ run folder files
    "run-json-corrupt": ("whylook explain", _run_json_corrupt),
    "run-json-other-schema": (
        "whylook explain",
        lambda c: c.explain(c.edit_manifest(c.run(), lambda m: m.update(schema="other/9"))),
    ),
    "run-json-malformed": (
        "whylook explain",
        lambda c: c.explain(c.edit_manifest(c.run(), lambda m: m["config"].pop("model"))),
    ),
    "run-json-steps-not-increasing": (
        "whylook explain",
        lambda c: c.explain(c.edit_manifest(
            c.run(), lambda m: m["checkpoints"][2].update(step=m["checkpoints"][1]["step"]))),
    ),
    "run-json-data-limit-not-a-number": (
        "whylook explain",
        lambda c: c.explain(c.edit_manifest(
            c.run(), lambda m: m["config"].update(data_limit_per_class="x"))),
    ),
    "run-model-code-untrusted": (
        "whylook explain",
        lambda c: c.explain(c.edit_manifest(
            c.run(), lambda m: m["config"].update(model="whylook_untrusted_probe:build"))),
    ),
    "explanation-missing": ("whylook report", lambda c: ["report", str(c.run())]),
    "report-out-not-writable": ("whylook report", _report_into_a_file),
    "report-class-unknown": (
        "whylook report", lambda c: ["report", str(c.run(analysis=True)), "--classes", "11"]
    ),
    "report-classes-before-run": (
        "whylook report", lambda c: ["report", "--classes", "ring", str(c.run(analysis=True))]
    ),
    "explanation-json-corrupt": (
        "whylook report",
        lambda c: _analysis(c, lambda a: (a / "explanation.json").write_text("{\"k\": ")),
    ),
    "arrays-npz-corrupt": (
        "whylook report",
        lambda c: _analysis(c, lambda a: (a / "arrays.npz").write_bytes(
            (a / "arrays.npz").read_bytes()[:5000])),
    ),
    "data-changed": ("whylook explain", _changed_data),
    # ------------------------------------------------------------------ concurrency
    "run-folder-in-use": ("whylook explain", _busy),
}


def test_the_doc_and_the_tests_list_the_same_bad_inputs() -> None:
    rows = doc_rows()
    assert sorted(rows) == sorted(CASES), (
        f"only in the doc: {sorted(set(rows) - set(CASES))}; "
        f"only in the tests: {sorted(set(CASES) - set(rows))}"
    )
    for case_id, (command, _) in CASES.items():
        assert rows[case_id][0] == command, case_id


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input_gives_the_documented_message(
    case_id: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case_id == "device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    command, build = CASES[case_id]
    _, excerpt = doc_rows()[case_id]
    data, reference = baseline(tmp_path_factory)
    ctx = Ctx(tmp_path, data, reference, monkeypatch)
    try:
        _check(case_id, command, build(ctx), excerpt, tmp_path, capsys)
    finally:
        sys.modules.pop(USER_MODULE, None)


def _check(
    case_id: str,
    command: str,
    made: list[str] | Callable[[], object],
    excerpt: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    if command.startswith("whylook "):
        argv: list[str] = []
        out: Path | None = None
        before = None
        if callable(made):  # the call runs the command itself (e.g. under a held lock)
            code = made()
        else:
            argv = made
            out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
            before = sorted(out.rglob("*")) if out is not None and out.exists() else None
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse refuses an option before main's handler
                code = exc.code
        assert code == 2, case_id
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: "), lines[0]
        assert excerpt in lines[0], lines[0]
        assert not (tmp_path / "pwned").exists()
        if out is not None:  # a refused train/import writes nothing into --out
            assert (sorted(out.rglob("*")) if out.exists() else None) == before
    else:
        with pytest.raises(WhylookError) as info:
            made()
        assert "\n" not in str(info.value)
        assert excerpt in str(info.value), str(info.value)
