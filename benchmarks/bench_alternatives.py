"""Two ways to bring `whylook explain` closer to its floor that were measured and not taken.

1. **Overlap**: run the analysis stages (HDBSCAN patterns, class-conditional ridge) in a
   background thread while the saliency passes of all checkpoints run, against running
   them one after the other.
2. **Stacked checkpoints**: evaluate every checkpoint in one batched model
   (``torch.func.vmap`` over stacked parameters, which turns convolutions into grouped
   ones) with the backward stopped at the layer, against the floor (one bare pass per
   checkpoint, as in ``bench_analysis.py``).

Needs a run with an analysis (``whylook explain RUN`` first, for the arrays the analysis
stages read) and a model whose prototype layer is a module attribute path:

    python benchmarks/bench_alternatives.py RUN --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import _batches, contender_images, load_models, machine_info, run_floor

from whylook import intensity as inten
from whylook.mapping import fit_class_mapping
from whylook.models import layer_shape
from whylook.patterns import find_patterns
from whylook.run import RunFolder
from whylook.saliency import GradCAM


def overlap(run: RunFolder, models: list[torch.nn.Module], repeats: int) -> list[dict[str, float]]:
    arrays = np.load(run.path / "analysis" / "arrays.npz")
    rows, labels = arrays["sample_index"], arrays["labels"].astype(np.int64)
    images = run.data().train.images
    jobs = torch.get_num_threads()

    def saliency() -> None:
        for m in models:
            list(GradCAM(m, run.layer).batches(images, labels, rows=rows, batch_size=256))

    def analysis() -> None:
        find_patterns(arrays["confidence"], labels, profile=arrays["activity"], n_jobs=jobs)
        fit_class_mapping(inten.delta(arrays["intensity"]), inten.delta(arrays["confidence"]),
                          labels, n_jobs=jobs)

    saliency()
    analysis()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        saliency()
        s = time.perf_counter() - t
        t = time.perf_counter()
        analysis()
        a = time.perf_counter() - t
        t = time.perf_counter()
        worker = threading.Thread(target=analysis)
        worker.start()
        saliency()
        worker.join()
        both = time.perf_counter() - t
        out.append({"saliency": s, "analysis": a, "sequential": s + a, "overlapped": both})
        print(f"  overlap: saliency {s:.2f} + analysis {a:.2f} = {s + a:.2f} s; "
              f"overlapped {both:.2f} s", flush=True)
    return out


def stacked(run: RunFolder, models: list[torch.nn.Module], n: int, repeats: int
            ) -> list[dict[str, float]]:
    from torch.func import functional_call, stack_module_state, vjp, vmap

    data = run.data()
    train = data.train
    images = contender_images(train.images[:n])
    labels = train.labels[:n].astype(np.int64)
    base = models[0]
    layer = dict(base.named_modules())[run.layer]
    for m in models:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    shift: dict[str, torch.Tensor] = {}

    # d logits / d (layer output) = d logits / d shift at shift = 0: the backward starts at
    # the logits and stops at the layer, as the floor's does.
    def target(p: Any, b: Any, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor
               ) -> torch.Tensor:
        shift["d"] = d
        return functional_call(base, (p, b), (x,)).gather(1, y[:, None]).sum()

    def grads(p: Any, b: Any, x: torch.Tensor, y: torch.Tensor, d0: torch.Tensor
              ) -> torch.Tensor:
        value, pull = vjp(lambda d: target(p, b, x, y, d), d0)
        return pull(torch.ones_like(value))[0]

    batched = vmap(grads, in_dims=(0, 0, None, None, None))
    grid = layer_shape(base, run.layer, (data.channels, *data.image_size))

    def run_stacked() -> None:
        for x, y in _batches(images, labels, 256, torch.device("cpu")):
            batched(params, buffers, x, y, torch.zeros(len(x), *grid))

    out = []
    handle = None
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            run_floor(models, run.layer, images, labels, 256, torch.device("cpu"), False)
            f = time.perf_counter() - t
            handle = layer.register_forward_hook(lambda _m, _i, out: out + shift["d"])
            t = time.perf_counter()
            run_stacked()
            s = time.perf_counter() - t
            handle.remove()
            out.append({"floor": f, "stacked": s})
            print(f"  stacked: floor {f:.2f} s, all checkpoints in one vmap {s:.2f} s",
                  flush=True)
    finally:
        if handle is not None:
            handle.remove()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder with an analysis")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="samples for the stacked section")
    ap.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = RunFolder.open(args.run)
    models = load_models(run, torch.device("cpu"))
    res: dict[str, Any] = {"command": "python benchmarks/bench_alternatives.py "
                           + " ".join(sys.argv[1:]),
                           "machine": machine_info(args.threads, torch.device("cpu"))}
    res["overlap"] = overlap(run, models, args.repeats)
    res["stacked"] = stacked(run, models, args.n, args.repeats)
    res["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
