"""smallcnn's layers before the prototype layer, one by one: NHWC with fused pairs against
oneDNN's blocked layout (whylook/_fusion.py).

Times each step of the forward pass up to the layer on one batch, the two ways whylook's
CPU passes can run it, interleaved and repeated:

* ``NHWC pairs``: each Conv2d -> ReLU pair as one ``_convolution_pointwise`` kernel on
  NHWC tensors (oneDNN picks its matrix-product "brgemm" convolution there), and 2x2
  max-pooling as two ``torch.maximum`` (whylook/_pooling.py);
* ``blocked, ReLU apart`` (whylook's runs from 2026-12-06 22:48 UTC to 2026-12-07 01:00
  UTC): the same layers on oneDNN's own tensors (channels blocked by 16: its direct
  convolution and its pooling), the ReLU as its own step, after the pooling where one
  follows, and the conversions in and out;
* ``blocked, ReLU as post-op`` (whylook's runs since): the same, each convolution and its
  ReLU as one ``_convolution_pointwise`` call on the blocked tensors, the pooling after.

Models and data are loaded before timing; one thread unless ``--threads``.

    python benchmarks/bench_blocked.py RUN [--batch 256] [--repeats 15] [--threads 1]
                                           [--out FILE.json]

RUN: a ``smallcnn`` run folder (e.g. the analysis benchmark's,
/tmp/whylook-bench-runs/smallcnn-mnist-npz-lNone-c24-sub12); its final checkpoint is used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from bench_analysis import contender_images, machine_info, write_result  # noqa: E402

from whylook._fusion import _conv_relu, _kernel  # noqa: E402
from whylook._pooling import max_pool_2x2  # noqa: E402
from whylook.explain import stratified_rows  # noqa: E402
from whylook.run import RunFolder  # noqa: E402

Step = tuple[str, Callable[[torch.Tensor], torch.Tensor]]

#: smallcnn before its layer (and the layer's own convolution): (convolution, pooled after).
CONVS = (("block1.conv", True), ("block2.conv1", False), ("block2.conv2", True),
         ("block3.conv", False))


def nhwc_steps(modules: dict[str, nn.Module]) -> list[Step]:
    kernel = _kernel()
    assert kernel is not None, "this torch build has no oneDNN convolution kernel"
    steps: list[Step] = []
    for name, pooled in CONVS:
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        steps.append((name + " + ReLU", lambda h, c=conv: _conv_relu(kernel, h, c, c.weight,
                                                                     c.bias)))
        if pooled:
            steps.append((name.split(".")[0] + ".pool", max_pool_2x2))
    return steps


def blocked_steps(modules: dict[str, nn.Module], post_op: bool) -> list[Step]:
    kernel = _kernel()
    assert kernel is not None, "this torch build has no oneDNN convolution kernel"
    steps: list[Step] = [("to blocked", lambda h: h.to_mkldnn())]
    for name, pooled in CONVS:
        conv = modules[name]
        assert isinstance(conv, nn.Conv2d)
        if post_op:
            steps.append((name + " + ReLU", lambda h, c=conv: _conv_relu(kernel, h, c,
                                                                         c.weight, c.bias)))
        else:
            steps.append((name, lambda h, c=conv: torch.mkldnn_convolution(
                h, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)))
        if pooled:
            steps.append((name.split(".")[0] + ".pool", lambda h: torch.max_pool2d(h, 2)))
        if not post_op:
            steps.append((name + " ReLU", torch.relu_))
    steps.append(("back to NHWC", lambda h: h.to_dense().contiguous(
        memory_format=torch.channels_last)))
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = RunFolder.open(args.run)
    model = run.load_model(len(run.checkpoints) - 1).eval()
    model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    train = run.data().train
    rows = stratified_rows(train.labels, args.batch, seed=0)
    x = torch.from_numpy(contender_images(train.images[rows])).float().div_(255.0)
    x = modules["normalize"](x).contiguous(memory_format=torch.channels_last)
    ways = {"NHWC pairs": nhwc_steps(modules),
            "blocked, ReLU apart": blocked_steps(modules, post_op=False),
            "blocked, ReLU as post-op": blocked_steps(modules, post_op=True)}
    times: dict[str, dict[str, list[float]]] = {w: {n: [] for n, _ in s} for w, s in ways.items()}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for r in range(args.repeats + 2):  # two warm-ups
            for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                h = x
                for name, step in ways[way]:
                    start = time.perf_counter()
                    h = step(h)
                    if r >= 2:
                        times[way][name].append(time.perf_counter() - start)
                outputs[way] = h
    a = outputs["NHWC pairs"]
    diff = max(float((a - b).abs().max() / a.abs().max()) for b in outputs.values())
    med = {w: {n: 1000 * statistics.median(v) for n, v in t.items()} for w, t in times.items()}
    print(f"{args.batch} images, {args.threads} thread(s), median of {args.repeats} (ms):")
    for way, steps in med.items():
        print(f"  {way}: " + ", ".join(f"{n} {v:.2f}" for n, v in steps.items())
              + f"; total {sum(steps.values()):.2f}")
    print(f"  the layer's output: largest difference {diff:.1e} of its largest value "
          "(blocked against NHWC pairs)")
    write_result(args.out, {
        "machine": machine_info(args.threads, torch.device("cpu")),
        "batch": args.batch, "repeats": args.repeats, "median_ms": med,
        "max_rel_diff": diff, "seconds": times,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
