"""Step 5 alone: the ridge fits with jackknife against bootstrap standard errors.

Reads the arrays of a finished analysis (``analysis/arrays.npz``), refits Step 5 as
``explain`` does (every transition, every HDBSCAN group, every class) with each method
on one thread, and prints the times and how the z-scores compare.

    python benchmarks/bench_mapping.py RUN/analysis/arrays.npz [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from whylook.intensity import delta
from whylook.mapping import fit_class_mapping, fit_mapping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arrays", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    a = np.load(args.arrays)
    dp, dy = delta(a["intensity"].astype(np.float64)), delta(a["confidence"])
    labels, groups = a["labels"], a["groups"].astype(np.int64)
    print(f"{platform.processor() or platform.machine()}, 1 thread; T={dp.shape[0]}, "
          f"n={dp.shape[1]}, K={dp.shape[2]}, M={dy.shape[2]}")

    def step5(method: str) -> tuple[object, object]:
        return (fit_mapping(dp, dy, groups=groups, standard_errors=method, n_jobs=1),
                fit_class_mapping(dp, dy, labels, standard_errors=method, n_jobs=1))

    fits, times = {}, {}
    with threadpool_limits(1):
        for method in ("jackknife", "bootstrap"):
            step5(method)  # warm-up
        for method in ("jackknife", "bootstrap") * args.repeats:  # interleaved
            start = time.perf_counter()
            fits[method] = step5(method)
            times.setdefault(method, []).append(time.perf_counter() - start)
    for method, ts in times.items():
        print(f"{method:>9}: median {np.median(ts):.3f} s, best {min(ts):.3f} s "
              f"over {len(ts)} runs")
    speedup = np.median(times["bootstrap"]) / np.median(times["jackknife"])
    print(f"bootstrap / jackknife: {speedup:.1f}x")
    for name, index in (("global", 0), ("class-conditional", 1)):
        zj = np.asarray(fits["jackknife"][index].z, np.float64)
        zb = np.asarray(fits["bootstrap"][index].z, np.float64)
        sel = np.abs(zb) > 1
        ratio = np.abs(zj[sel]) / np.abs(zb[sel])
        q = np.quantile(ratio, [0.05, 0.5, 0.95])
        print(f"{name}: jackknife |z| / bootstrap |z| where bootstrap |z| > 1: median "
              f"{q[1]:.2f}, 5-95% {q[0]:.2f}-{q[2]:.2f}; |z| >= 2.28: bootstrap "
              f"{int((np.abs(zb) >= 2.28).sum())}, jackknife {int((np.abs(zj) >= 2.28).sum())}")


if __name__ == "__main__":
    main()
