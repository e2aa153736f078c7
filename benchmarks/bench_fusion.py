"""Grad-CAM passes each in a fresh process, as a CLI call runs them: whylook with and
without its fused Conv2d -> ReLU kernels, Captum, and the floor.

In one long-lived process the allocator keeps memory it has freed, and the out-of-place
ReLU's tensors cost little; a fresh process (every ``whylook explain``, every script a
user writes around Captum) gets its memory from the kernel page by page, and each ReLU
output may be page-faulted in anew. So every contender runs in processes of its own,
the contenders alternating (their order rotated between repeats):

* ``--what gradcam`` (default): Grad-CAM over every checkpoint of a run on the analysis
  set explain would use (n samples, batch 256), with the same model objects, images and
  input preparation as ``bench_analysis.py``'s saliency section (its functions are used);
  ``--peers`` adds Captum (logits by a hook; NCHW and NHWC model) and the floors.
* ``--what explain``: the whole ``whylook.explain`` on a fresh cache, with fusing on and
  turned off inside whylook.

Wall time, page faults and system CPU time of the timed part (models and data are loaded
before it).

    python benchmarks/bench_fusion.py RUN [--what gradcam|explain] [--peers] [--n 2000]
                                          [--threads 1] [--repeats 4]

RUN: a run folder (e.g. the analysis benchmark's, /tmp/whylook-bench-runs/...-sub12).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WHYLOOK = ("whylook", "whylook (unfused)")
PEERS = ("captum", "captum (NHWC model)", "floor (NHWC)", "floor (NHWC, fused)")


def child(run_path: str, what: str, variant: str, n: int, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_analysis as ba

    import whylook.saliency
    from whylook.explain import explain, stratified_rows
    from whylook.run import RunFolder

    run = RunFolder.open(run_path)
    device = torch.device("cpu")
    if what == "explain":
        shutil.rmtree(run.path / "analysis", ignore_errors=True)
        if variant == "whylook (unfused)":
            whylook.saliency._use_fusion = lambda fuse: False  # type: ignore[assignment]
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        explain(run, analysis_size=n, progress=False)
    else:
        train = run.data().train
        rows = stratified_rows(train.labels, n, seed=0)
        images = ba.contender_images(train.images[rows])
        labels = train.labels[rows].astype(np.int64)
        models = [run.load_model(i) for i in range(len(run.checkpoints))]
        calls = {
            "whylook": lambda: ba.run_whylook(models, run.layer, images, labels, 256, device),
            "whylook (unfused)": lambda: ba.run_whylook(models, run.layer, images, labels, 256,
                                                        device, fuse=False),
            "captum": lambda: ba.run_captum(models, run.layer, images, labels, 256, device),
            "captum (NHWC model)": lambda: ba.run_captum(models, run.layer, images, labels, 256,
                                                         device, nhwc=True),
            "floor (NHWC)": lambda: ba.run_floor(models, run.layer, images, labels, 256, device,
                                                 nhwc=True),
            "floor (NHWC, fused)": lambda: ba.run_floor(models, run.layer, images, labels, 256,
                                                        device, nhwc=True, fused=True),
        }
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        calls[variant]()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"variant": variant, "wall": wall,
                      "page_faults": after.ru_minflt - before.ru_minflt,
                      "sys": after.ru_stime - before.ru_stime,
                      "user": after.ru_utime - before.ru_utime}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--what", choices=["gradcam", "explain"], default="gradcam")
    ap.add_argument("--peers", action="store_true", help="also Captum and the floors (gradcam)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.run, args.what, args.child, args.n, args.threads)
        return
    variants = list(WHYLOOK) + (list(PEERS) if args.peers and args.what == "gradcam" else [])
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(args.repeats):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            proc = subprocess.run(
                [sys.executable, __file__, args.run, "--what", args.what, "--n", str(args.n),
                 "--threads", str(args.threads), "--child", variant],
                capture_output=True, text=True, check=True,
                env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
            )
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].append(row)
            print(f"  {variant:20s} wall {row['wall']:6.2f} s  page faults "
                  f"{row['page_faults']:>9,}  sys {row['sys']:.2f} s", flush=True)
    print(f"\n{args.what}: checkpoints of {args.run}, n = {args.n}, {args.threads} thread(s), "
          f"{args.repeats} fresh processes each, alternating; medians:\n")
    med = {v: statistics.median(r["wall"] for r in rows) for v, rows in results.items()}
    print("| contender | wall (s): median (range) | page faults | system CPU (s) | "
          "/ whylook |")
    print("|---|---:|---:|---:|---:|")
    for variant in sorted(variants, key=med.__getitem__):
        rows = results[variant]
        walls = [r["wall"] for r in rows]
        print(f"| {variant} | {med[variant]:.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
              f"{statistics.median(r['page_faults'] for r in rows):,.0f} | "
              f"{statistics.median(r['sys'] for r in rows):.2f} | "
              f"{med[variant] / med['whylook']:.2f}x |")


if __name__ == "__main__":
    main()
