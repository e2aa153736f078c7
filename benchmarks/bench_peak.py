"""How far the Grad-CAM pass is from the CPU's arithmetic limit: the convolutions of the
default model against the core's matrix-product rate, and what that leaves for a speed-up
over Captum.

Usage::

    python benchmarks/bench_peak.py [--threads 1] [--n 1024] [--repeats 5] [--out F.json]

1. **The core's rate**: a float32 2048 x 2048 matrix product (oneDNN/MKL through torch),
   in GFLOP/s: the practical peak of the thread(s).
2. **Each convolution** of ``smallcnn`` on 28 x 28 images, batch 256,
   alone, in NHWC (the layout whylook runs CPU models in), with torch's ``conv2d``: its
   GFLOP/s, and the sum of their times per batch.
3. **Whole passes** over ``--n`` MNIST images, one checkpoint (``--run``'s final one, or
   weights initialised with seed 0): whylook (``grad_cam``), Captum's ``LayerGradCam``
   with its logits caught by a hook (as in ``bench_analysis.py``), the bare floor;
   interleaved, medians of ``--repeats``.

It prints the share of whylook's pass that is convolution at the measured rate, and the
bound: Captum's pass over the convolutions alone, the speed-up over Captum of a pass that
did nothing but its convolutions. Data: real MNIST from ``../shared/data`` beside the
checkout when present, else the built-in MNIST-5k.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
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
from bench_pooling import median_ms  # noqa: E402

from whylook.data import load_data  # noqa: E402
from whylook.explain import stratified_rows  # noqa: E402
from whylook.models import build_model  # noqa: E402
from whylook.run import RunFolder  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BATCH = 256


def matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / (median_ms(lambda: a @ b, repeats) / 1e3) / 1e9


def conv_shapes(model: nn.Module, image: torch.Tensor) -> list[dict[str, Any]]:
    """The convolutions of one forward pass, with their input shapes."""
    seen: list[dict[str, Any]] = []
    handles = [m.register_forward_hook(
        lambda mod, inp, _out, name=name: seen.append({"name": name, "module": mod,
                                                        "input": tuple(inp[0].shape)}))
        for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in handles:
            h.remove()
    # The forward runs the whole model, so a convolution after the layer counts too.
    return seen


def time_convs(shapes: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for s in shapes:
        conv: nn.Conv2d = s["module"]
        x = torch.randn(BATCH, *s["input"][1:]).contiguous(memory_format=torch.channels_last)
        w = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        b = None if conv.bias is None else conv.bias.detach()

        def run(x: torch.Tensor = x, w: torch.Tensor = w, b: torch.Tensor | None = b,
                conv: nn.Conv2d = conv) -> torch.Tensor:
            return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

        out = run()
        seconds = median_ms(run, repeats * 4) / 1e3
        k = conv.kernel_size[0] * conv.kernel_size[1]
        flops = 2 * out.numel() * (conv.in_channels // conv.groups) * k
        rows.append({"conv": s["name"], "input": list(x.shape), "ms": seconds * 1e3,
                     "gflops": flops / seconds / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1024, help="images per pass")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--run", type=Path, default=None,
                    help="a smallcnn run folder: its final checkpoint and layer (default: "
                         "weights initialised with seed 0, layer block3)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    data = load_data(f"npz:{SHARED / 'mnist.npz'}" if (SHARED / "mnist.npz").is_file()
                     else "mnist5k")
    # The rows explain analyses (a stratified sample), as bench_analysis.py takes them.
    rows = stratified_rows(data.train.labels, args.n, seed=0)
    images = ba.contender_images(data.train.images[rows])
    labels = data.train.labels[rows].astype(np.int64)
    if args.run is not None:
        run = RunFolder.open(args.run)
        model, layer = run.load_model(-1).eval(), run.layer
    else:
        torch.manual_seed(0)
        model = build_model("smallcnn", num_classes=10, in_channels=1,
                            image_size=(28, 28)).eval()
        layer = "block3"

    peak = matmul_gflops(args.repeats)
    convs = time_convs(conv_shapes(model, torch.zeros(1, 1, 28, 28)), args.repeats)
    conv_per_batch = sum(r["ms"] for r in convs) / 1e3
    batches = -(-args.n // BATCH)
    conv_seconds = conv_per_batch * batches

    contenders: dict[str, Callable[[], Any]] = {
        "whylook": lambda: ba.run_whylook([model], layer, images, labels, BATCH, device),
        "captum": lambda: ba.run_captum([model], layer, images, labels, BATCH, device),
        "floor": lambda: ba.run_floor([model], layer, images, labels, BATCH, device, True),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    names = list(contenders)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}

    print(f"matrix product, float32, {args.threads} thread(s): {peak:.0f} GFLOP/s")
    print("\n| convolution | input (NHWC batch) | ms per batch | GFLOP/s | of the product's |")
    print("|---|---|---:|---:|---:|")
    for r in convs:
        print(f"| {r['conv']} | {tuple(r['input'])} | {r['ms']:.2f} | {r['gflops']:.0f} | "
              f"{r['gflops'] / peak:.0%} |")
    print(f"\nconvolutions alone over {args.n} images: {conv_seconds:.3f} s")
    print("\n| pass (1 checkpoint) | seconds (median) | convolutions' share |")
    print("|---|---:|---:|")
    for name, sec in sorted(med.items(), key=lambda kv: kv[1]):
        print(f"| {name} | {sec:.3f} | {conv_seconds / sec:.0%} |")
    bound = med["captum"] / conv_seconds
    print(f"\nwhylook / Captum: {med['captum'] / med['whylook']:.2f}x; a pass of nothing but "
          f"its convolutions would be {bound:.2f}x Captum")
    if args.out:
        args.out.write_text(json.dumps({
            "threads": args.threads, "n": args.n, "batch": BATCH, "matmul_gflops": peak,
            "convolutions": convs, "conv_seconds": conv_seconds, "passes": times,
            "medians": med, "captum_over_convs": bound,
            "run": None if args.run is None else str(args.run),
            "torch": torch.__version__, "cpu": ba.cpu_name(),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
