"""HDBSCAN of the patterns stage: scikit-learn's neighbour-search algorithms compared.

``whylook.patterns.find_patterns`` runs one HDBSCAN per transition and one per class, with
scikit-learn's default ``algorithm="auto"`` (a k-d tree here). This reruns exactly those
fits on a run's stored confidences and activity, once per algorithm, and reports the time
and whether the groups are the same as the default's. ``brute`` builds an n x n distance
matrix per fit (32 MB at n = 2000, 800 MB at n = 10,000).

    python benchmarks/bench_hdbscan.py RUN                  # RUN/analysis/arrays.npz
    python benchmarks/bench_hdbscan.py RUN --threads 1 --repeats 5 --out results/hdb.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_analysis import machine_info
from sklearn.cluster import HDBSCAN
from threadpoolctl import threadpool_limits

import whylook.patterns as patterns

ALGORITHMS = ("auto", "brute", "ball_tree")


def _time(arrays: dict[str, np.ndarray], algorithm: str, repeats: int, n_jobs: int):
    patterns.HDBSCAN = functools.partial(HDBSCAN, algorithm=algorithm)  # type: ignore[misc]
    try:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = patterns.find_patterns(arrays["confidence"], arrays["labels"],
                                           profile=arrays["activity"], n_jobs=n_jobs)
            seconds.append(time.perf_counter() - t0)
    finally:
        patterns.HDBSCAN = HDBSCAN  # type: ignore[misc]
    return seconds, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with np.load(args.run / "analysis" / "arrays.npz") as npz:
        arrays = {k: npz[k] for k in ("confidence", "labels", "activity")}
    t1, n, m = arrays["confidence"].shape
    rows = []
    info = machine_info(args.threads, torch.device("cpu"))
    with threadpool_limits(args.threads):
        base = None
        for algorithm in ALGORITHMS:
            seconds, found = _time(arrays, algorithm, args.repeats, args.threads)
            base = base or found
            same = bool(np.array_equal(found.groups, base.groups)
                        and np.array_equal(found.class_groups, base.class_groups))
            rows.append({"algorithm": algorithm, "median_s": float(np.median(seconds)),
                         "seconds": seconds, "same_groups_as_auto": same})
            print(f"{algorithm:>10}: {np.median(seconds):.3f} s (median of {args.repeats}), "
                  f"same groups as auto: {same}", flush=True)
    result = {
        "machine": info,
        "run": str(args.run), "transitions": t1 - 1, "n": n, "classes": m,
        "command": "python benchmarks/bench_hdbscan.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
