"""2x2 max-pooling without indices (``whylook/_pooling.py``) on CPU: the pooling alone, and
whole Grad-CAM passes with it and without it.

Usage::

    python benchmarks/bench_pooling.py [--threads 1] [--n 1000] [--repeats 5] [--out F.json]

1. **The pooling alone**: ``F.max_pool2d(x, 2)`` (torch: ``max_pool2d_with_indices``)
   against ``max_pool_2x2`` on the shapes of the models below at batch 256, in NCHW and
   NHWC, float32 and bfloat16; the median of 30 calls after 2 warm-up calls.
2. **Grad-CAM passes** over ``--n`` images, batch 256, weights initialised with seed 0 (the
   pooling's cost does not depend on the weights): ``smallcnn`` on MNIST (NHWC), and the
   network of PyTorch's CIFAR-10 tutorial on CIFAR-10 images in its two forms:
   ``torch.flatten`` before the classifier (whylook runs it in NHWC) and ``x.view(-1,
   16 * 5 * 5)`` (which fails in NHWC, so whylook runs it in NCHW). Contenders, interleaved,
   their order rotated, medians of ``--repeats``: whylook; whylook trying NHWC on the
   first batch of every call, as it did before it remembered a model object that failed
   there; whylook without the pooling (its other kernels on); whylook with
   ``fuse=False``; the bare floor (forward, backward to the layer; in the layout whylook
   runs the model in); Captum's ``LayerGradCam`` with the logits caught by a hook, on the
   model as the user has it (NCHW). And the LeNet of PyTorch's "Neural Networks" tutorial
   on MNIST, whose ``forward`` pools with ``F.max_pool2d`` and flattens with ``.view``.

Data: ``../shared/data`` beside the checkout when present (real MNIST and CIFAR-10), else
the built-in MNIST-5k and uniform noise for CIFAR-10.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_analysis as ba  # noqa: E402

import whylook.saliency  # noqa: E402
from whylook._pooling import max_pool_2x2  # noqa: E402
from whylook.data import load_data  # noqa: E402
from whylook.models import build_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


class TutorialNet(nn.Module):
    """The network of PyTorch's "Training a classifier" (CIFAR-10) tutorial."""

    def __init__(self, view: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5) if self.view else torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet(nn.Module):
    """The network of PyTorch's "Neural Networks" tutorial, which pools with
    ``F.max_pool2d`` and flattens with ``.view``, for 28 x 28 inputs (``fc1`` takes
    16 x 4 x 4 instead of the tutorial's 16 x 5 x 5 for 32 x 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def num_flat_features(self, x: torch.Tensor) -> int:
        return int(torch.tensor(x.shape[1:]).prod())


def median_ms(fn: Callable[[], Any], calls: int = 30) -> float:
    fn()
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_pool() -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in [(256, 16, 28, 28), (256, 64, 14, 14), (256, 6, 28, 28), (256, 16, 10, 10)]:
        for dtype in (torch.float32, torch.bfloat16):
            for nhwc in (False, True):
                x = torch.relu(torch.randn(shape, generator=gen)).to(dtype)
                if nhwc:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))
                    a = median_ms(lambda x=x: F.max_pool2d(x, 2))
                    b = median_ms(lambda x=x: max_pool_2x2(x))
                rows.append({"shape": list(shape), "dtype": str(dtype)[6:],
                             "layout": "NHWC" if nhwc else "NCHW", "torch_ms": a, "whylook_ms": b})
                print(f"| {tuple(shape)} | {rows[-1]['dtype']} | {rows[-1]['layout']} | "
                      f"{a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)
    return rows


def _images(kind: str, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    if kind == "mnist":
        spec = f"npz:{SHARED / 'mnist.npz'}" if (SHARED / "mnist.npz").is_file() else "mnist5k"
        split = load_data(spec).train
        return ba.contender_images(split.images[:n]), split.labels[:n], spec
    if (SHARED / "cifar10-jpg.zip").is_file():
        spec = f"folder:{SHARED / 'cifar10-jpg.zip'}"
        split = load_data(spec, limit_per_class=-(-n // 10)).train
        return split.images[:n], split.labels[:n], spec
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64), "uniform noise")


@contextlib.contextmanager
def _no_fast_pool() -> Iterator[None]:
    real = whylook.saliency.fast_max_pool
    whylook.saliency.fast_max_pool = contextlib.nullcontext  # type: ignore[assignment]
    try:
        yield
    finally:
        whylook.saliency.fast_max_pool = real  # type: ignore[assignment]


def _runs_nhwc(model: nn.Module, layer: str, x: np.ndarray, y: np.ndarray) -> bool:
    with whylook.saliency.GradCAM(model, layer) as cam:
        cam(torch.from_numpy(x[:2].copy()).float().div(255), torch.from_numpy(y[:2].copy()))
        return bool(cam._session.channels_last)


def _contenders(model: nn.Module, layer: str, x: np.ndarray, y: np.ndarray,
                nhwc: bool) -> dict[str, Callable[[], Any]]:
    cpu, models = torch.device("cpu"), [model]

    def without_pool() -> None:
        with _no_fast_pool():
            ba.run_whylook(models, layer, x, y, 256, cpu)

    def first_session() -> None:
        # As before whylook remembered a model object that failed in NHWC: every call
        # tries NHWC on its first batch again.
        whylook.saliency._NCHW_ONLY.discard(model)
        ba.run_whylook(models, layer, x, y, 256, cpu)

    return {
        "whylook": lambda: ba.run_whylook(models, layer, x, y, 256, cpu),
        "whylook, NCHW not remembered": first_session,
        "whylook, no fast pooling": without_pool,
        "whylook, fuse=False": lambda: ba.run_whylook(models, layer, x, y, 256, cpu,
                                                      fuse=False),
        "floor": lambda: ba.run_floor(models, layer, x, y, 256, cpu, nhwc=nhwc),
        "captum (hook)": lambda: ba.run_captum(models, layer, x, y, 256, cpu),
    }


def bench_passes(n: int, repeats: int) -> list[dict[str, Any]]:
    cases: list[tuple[str, nn.Module, str, str]] = []
    torch.manual_seed(0)
    cases.append(("smallcnn", build_model("smallcnn", num_classes=10, in_channels=1,
                                          image_size=28), "block3", "mnist"))
    for view in (False, True):
        torch.manual_seed(0)
        cases.append((f"CIFAR-10 tutorial ({'view' if view else 'flatten'})",
                      TutorialNet(view), "conv2", "cifar"))
    torch.manual_seed(0)
    cases.append(("LeNet (F.max_pool2d, view)", LeNet(), "conv2", "mnist"))
    rows = []
    for name, model, layer, data in cases:
        model.eval()
        x, y, spec = _images(data, n)
        nhwc = _runs_nhwc(model, layer, x, y)
        calls = _contenders(model, layer, x, y, nhwc)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for fn in calls.values():
            fn()
        order = list(calls)
        for r in range(repeats):
            for k in order[r % len(order):] + order[:r % len(order)]:
                start = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, "data": spec, "layout": "NHWC" if nhwc else "NCHW",
                     "n": len(x), "seconds": times, "median": med})
        cells = " | ".join(f"{med[k]:.3f}" for k in calls)
        print(f"| {name} | {'NHWC' if nhwc else 'NCHW'} | {cells} | "
              f"{med['whylook, no fast pooling'] / med['whylook']:.2f}x | "
              f"{med['captum (hook)'] / med['whylook']:.2f}x | "
              f"{med['whylook'] / med['floor']:.2f}x |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = ba.machine_info(args.threads, torch.device("cpu"))
    print(f"{info.get('cpu', '')}; {args.threads} thread(s)\n")
    print("| shape (batch 256) | dtype | layout | torch max_pool2d (ms) | max_pool_2x2 (ms) "
          "| speed-up |\n|---|---|---|---:|---:|---:|")
    pool = bench_pool()
    print(f"\nGrad-CAM passes, n = {args.n}, batch 256, median of {args.repeats} (seconds)\n")
    print("| model | whylook runs it in | whylook | NCHW not remembered | without the fast "
          "pooling | fuse=False | floor | Captum (hook) | pooling's gain | whylook vs Captum "
          "| whylook / floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    passes = bench_passes(args.n, args.repeats)
    ba.write_result(args.out, {"machine": info, "pool": pool, "passes": passes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
