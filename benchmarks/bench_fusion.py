"""whylook's Grad-CAM passes with and without the fused Conv2d -> ReLU kernels, each in a
fresh process, as a CLI call runs them.

In one long-lived process the allocator keeps memory it has freed, and the out-of-place
ReLU's tensors cost little; a fresh process (every ``whylook explain``) gets its memory
from the kernel page by page, and each ReLU output is page-faulted in anew. So the two
variants alternate in fresh processes: Grad-CAM over every checkpoint of a run on the
analysis set explain would use (``--what gradcam``), or the whole ``whylook.explain`` on
a fresh cache (``--what explain``, the "off" variant with fusing turned off inside
whylook); wall time, page faults and system CPU time.

    python benchmarks/bench_fusion.py RUN [--what gradcam|explain] [--n 2000] [--threads 1]
                                          [--repeats 4]

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


def child(run_path: str, what: str, n: int, fuse: bool, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import whylook.saliency
    from whylook.explain import explain, stratified_rows
    from whylook.run import RunFolder
    from whylook.saliency import grad_cam

    run = RunFolder.open(run_path)
    if what == "explain":
        shutil.rmtree(run.path / "analysis", ignore_errors=True)
        if not fuse:
            whylook.saliency._use_fusion = lambda model, fuse: False  # type: ignore[assignment]
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        explain(run, analysis_size=n, progress=False)
    else:
        train = run.data().train
        rows = stratified_rows(train.labels, n, seed=0)
        models = [run.load_model(i) for i in range(len(run.checkpoints))]
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for m in models:
            grad_cam(m, run.layer, train.images, train.labels[rows], rows=rows, fuse=fuse)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"fuse": fuse, "wall": wall,
                      "page_faults": after.ru_minflt - before.ru_minflt,
                      "sys": after.ru_stime - before.ru_stime,
                      "user": after.ru_utime - before.ru_utime}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--what", choices=["gradcam", "explain"], default="gradcam")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.run, args.what, args.n, args.child == "on", args.threads)
        return
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for r in range(args.repeats):
        for variant in ("off", "on") if r % 2 == 0 else ("on", "off"):
            proc = subprocess.run(
                [sys.executable, __file__, args.run, "--what", args.what, "--n", str(args.n),
                 "--threads",
                 str(args.threads), "--child", variant],
                capture_output=True, text=True, check=True,
                env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
            )
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant].append(row)
            print(f"  fuse {variant:3s} wall {row['wall']:6.2f} s  page faults "
                  f"{row['page_faults']:>9,}  sys {row['sys']:.2f} s", flush=True)
    print(f"\n{args.what}: T+1 = checkpoints of {args.run}, n = {args.n}, {args.threads} "
          "thread(s), "
          f"{args.repeats} fresh processes each, alternating; medians:\n")
    print("| Conv2d -> ReLU | wall (s) | page faults | system CPU (s) |")
    print("|---|---:|---:|---:|")
    for variant, label in (("off", "separate (fuse=False)"), ("on", "fused (default)")):
        rows = results[variant]
        print(f"| {label} | {statistics.median(r['wall'] for r in rows):.2f} | "
              f"{statistics.median(r['page_faults'] for r in rows):,.0f} | "
              f"{statistics.median(r['sys'] for r in rows):.2f} |")
    off = statistics.median(r["wall"] for r in results["off"])
    on = statistics.median(r["wall"] for r in results["on"])
    print(f"\nfused / separate wall time: {on / off:.2f}")


if __name__ == "__main__":
    main()
