"""The prototype stage on wide features: PCA + K-Means where d = 1024 (ResNet-50's layer3).

On `smallcnn` (d = 64) the prototype stage is K-Means and little else; on a wide layer the
feature statistics and the PCA projection of the K-Means subsample grow with d (and d^2).
This times each step of ``PrototypeFinder`` on synthetic features of that width, with the
subsample projected in float64 chunks (whylook) and, for the ratio, as one whole float64
matrix product (how it was done before), in the same process.

    python benchmarks/bench_prototypes_wide.py                  # d = 1024, 2000 samples
    python benchmarks/bench_prototypes_wide.py --d 2048 --n 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from whylook.prototypes import PrototypeFinder, _pca, _project


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=1024, help="feature channels")
    ap.add_argument("--n", type=int, default=2000, help="samples (7x7 positions each)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # Channel scales spread over 30x, so the PCA has structure to find.
    scale = np.linspace(0.1, 3.0, args.d, dtype=np.float32)[None, :, None, None]
    finder = PrototypeFinder(k=args.k, seed=0)
    times: dict[str, float] = {}
    with threadpool_limits(args.threads):
        start = time.perf_counter()
        for lo in range(0, args.n, 250):
            b = min(250, args.n - lo)
            x = rng.standard_normal((b, args.d, 7, 7), dtype=np.float32) * scale
            finder.partial_fit(torch.from_numpy(x), sample_index=np.arange(lo, lo + b))
        times["feature statistics"] = time.perf_counter() - start
        stats = finder.stats
        assert stats is not None
        start = time.perf_counter()
        components, _ = _pca(stats.m2 / (stats.n - 1), min(args.d, 64))
        times["PCA (eigh)"] = time.perf_counter() - start
        order = np.argsort(stats.keys, kind="stable")
        start = time.perf_counter()
        whole = ((stats.vectors[order].astype(np.float64) - stats.mean) @ components.T).astype(
            np.float32
        )
        times["projection, whole matrix (before)"] = time.perf_counter() - start
        start = time.perf_counter()
        chunked = _project(stats.vectors, order, stats.mean, components)
        times["projection, float64 chunks (whylook)"] = time.perf_counter() - start
        start = time.perf_counter()
        finder.finalize()
        times["finalize (PCA + projection + K-Means)"] = time.perf_counter() - start
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "d": args.d,
        "vectors": int(stats.vectors.shape[0]),
        "identical": bool(np.array_equal(whole, chunked)),
        "seconds": {k: round(v, 3) for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
