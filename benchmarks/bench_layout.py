"""whylook's Grad-CAM pass in NHWC against NCHW on CPU, for the built-in models.

Usage::

    python benchmarks/bench_layout.py [--threads 1] [--n 512] [--repeats 3]

whylook runs every CPU model with a convolution in NHWC (``channels_last=None``); this
checks that choice per model on dense random images (weights initialised with seed 0):
the median of ``--repeats`` interleaved passes over ``--n`` images in each layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from whylook.models import build_model, default_layer  # noqa: E402
from whylook.saliency import grad_cam  # noqa: E402

CASES = (("smallcnn", 1, 28), ("smallcnn", 3, 32), ("resnet18", 1, 28), ("resnet18", 3, 32),
         ("resnet50", 3, 32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"| model | input | NHWC (s) | NCHW (s) | NCHW / NHWC |  ({args.threads} thread(s))")
    print("|---|---|---:|---:|---:|")
    for name, channels, size in CASES:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=channels, image_size=size)
        layer = default_layer(model)
        x = torch.rand(args.n, channels, size, size, generator=torch.Generator().manual_seed(1))
        y = torch.arange(args.n) % 10
        times: dict[bool, list[float]] = {True: [], False: []}
        for nhwc in times:  # warm-up
            grad_cam(model, layer, x[:256], y[:256], channels_last=nhwc)
        for _ in range(args.repeats):
            for nhwc in times:
                start = time.perf_counter()
                grad_cam(model, layer, x, y, channels_last=nhwc)
                times[nhwc].append(time.perf_counter() - start)
        a, b = statistics.median(times[True]), statistics.median(times[False])
        print(f"| `{name}` | {channels}x{size}x{size} | {a:.3f} | {b:.3f} | {b / a:.2f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
