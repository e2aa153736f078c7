"""How fast ``precision="bfloat16"`` is on CPUs with and without bfloat16 units.

Usage::

    python benchmarks/bench_bfloat16_isa.py RUN [--n 1024] [--repeats 5] [--out FILE.json]

One CPU stands in for several: each row runs in a fresh process with oneDNN limited to an
instruction set (``ONEDNN_MAX_CPU_ISA``: AMX and everything below it; AVX-512 with its
bfloat16 instructions; AVX-512 without them; AVX2), and times :func:`whylook.grad_cam` of
RUN's final checkpoint over ``--n`` training images in float32 and in bfloat16,
interleaved, 1 thread, the median of ``--repeats``. A limit cannot add units the CPU lacks,
so rows above the CPU's own set repeat its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISAS = ("DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE", "AVX2")

CHILD = """
import json, statistics, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from whylook.run import RunFolder
from whylook.saliency import grad_cam
run, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
folder = RunFolder.open(run)
model = folder.load_model(len(folder.checkpoints) - 1, device="cpu")
train = folder.data().train
x = np.ascontiguousarray(train.images[:n]); y = train.labels[:n].astype(np.int64)
times = {"float32": [], "bfloat16": []}
for p in times:  # warm-up
    grad_cam(model, folder.layer, x[:256], y[:256], precision=p)
for _ in range(repeats):
    for p in times:
        t = time.perf_counter()
        grad_cam(model, folder.layer, x, y, precision=p)
        times[p].append(time.perf_counter() - t)
print(json.dumps({p: statistics.median(v) for p, v in times.items()}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    rows = []
    for isa in ISAS:
        child_env = dict(env)
        if isa != "DEFAULT":
            child_env["ONEDNN_MAX_CPU_ISA"] = isa
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.run), str(args.n),
                               str(args.repeats)], env=child_env, capture_output=True,
                              text=True, check=True)
        sec = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"isa": isa, **sec, "bfloat16_speedup": sec["float32"] / sec["bfloat16"]})
        print(f"{isa:18s} float32 {sec['float32']:.3f} s  bfloat16 {sec['bfloat16']:.3f} s  "
              f"bfloat16 speed-up {rows[-1]['bfloat16_speedup']:.2f}x", flush=True)
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python benchmarks/bench_bfloat16_isa.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
