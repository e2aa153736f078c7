"""K-Means of the prototype stage: centres found on a part, refined over every vector.

``PrototypeFinder`` finds the K-Means centres on ``init_vectors`` (20,000) vectors of its
subsample and then runs ``refine_iter`` (10) Lloyd iterations over all of it. This compares
that with a K-Means fitted on all vectors (``init_vectors=None``), over several seeds,
on the final checkpoint's features of a real run: time, inertia over every vector (lower
is better), and how much the partitions agree (adjusted Rand index), against how much
two seeds of the full fit agree with each other.

    python benchmarks/bench_kmeans.py RUN                       # n = 2000, seeds 0-4
    python benchmarks/bench_kmeans.py RUN --n 4000 --seeds 3 --out results/kmeans.json
    python benchmarks/bench_kmeans.py RUN --n-init 3      # and with 3 k-means++ starts
    python benchmarks/bench_kmeans.py RUN --lloyd         # and with Lloyd's algorithm
    python benchmarks/bench_kmeans.py RUN --part-iter 20 30   # and with the part's fit capped
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from whylook.explain import stratified_rows
from whylook.prototypes import PrototypeFinder, Prototypes
from whylook.run import RunFolder
from whylook.saliency import layer_features


def _inertia_and_labels(protos: Prototypes, z: np.ndarray) -> tuple[float, np.ndarray]:
    centers = protos.centers
    d2 = (z**2).sum(1)[:, None] - 2.0 * z @ centers.T + (centers**2).sum(1)[None, :]
    labels = d2.argmin(1)
    return float(np.maximum(d2[np.arange(len(z)), labels], 0.0).sum()), labels


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder (whylook train / import)")
    ap.add_argument("--n", type=int, default=2000, help="analysis-set size")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-init", type=int, default=1,
                    help="also fit part + refinement with this many k-means++ starts")
    ap.add_argument("--lloyd", action="store_true",
                    help="also fit part + refinement with scikit-learn's Lloyd algorithm "
                         "instead of Elkan's (the default)")
    ap.add_argument("--part-iter", type=int, nargs="*", default=[],
                    help="also fit part + refinement with the part's K-Means stopped after "
                         "this many iterations (max_iter; the default runs to convergence)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    run = RunFolder.open(args.run)
    train = run.data().train
    rows = stratified_rows(train.labels, args.n, seed=0)
    model = run.load_model(-1)
    feats = torch.cat(list(layer_features(model, run.layer, train.images, rows=rows,
                                          progress=False)))
    print(f"features {tuple(feats.shape)} at {run.layer}", flush=True)

    variants = {"fit on all vectors": {"init_vectors": None},
                "part + refinement (default)": {}}
    if args.n_init > 1:
        variants[f"part + refinement, n_init={args.n_init}"] = {"n_init": args.n_init}
    if args.lloyd:
        variants["part + refinement, Lloyd"] = {"algorithm": "lloyd"}
    for cap in args.part_iter:
        variants[f"part capped at {cap} iterations + refinement"] = {"max_iter": cap}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    labels: dict[tuple[str, int], np.ndarray] = {}
    z: np.ndarray | None = None
    with threadpool_limits(args.threads):
        for seed in range(args.seeds):
            for name, kwargs in variants.items():
                finder = PrototypeFinder(k=args.k, seed=seed, **kwargs)
                finder.partial_fit(feats)
                start = time.perf_counter()
                protos = finder.finalize()
                seconds = time.perf_counter() - start
                if z is None:
                    z = protos.project(feats).reshape(-1, protos.centers.shape[1])
                inertia, labels[name, seed] = _inertia_and_labels(protos, z)
                results[name].append({"seed": seed, "seconds": seconds, "inertia": inertia})
                print(f"  seed {seed} {name}: {seconds:.2f} s, inertia {inertia:.6g}", flush=True)

    def agreement(a: str, b: str) -> list[float]:
        pairs = (itertools.combinations(range(args.seeds), 2) if a == b
                 else ((s, s) for s in range(args.seeds)))
        return [adjusted_rand_score(labels[a, i], labels[b, j]) for i, j in pairs]

    full, part = list(variants)[:2]
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__},
        "run": str(args.run), "n": args.n, "k": args.k, "vectors": int(z.shape[0]),
        "results": results,
        "ari_between_seeds_full": agreement(full, full),
        "ari_same_seed_part_vs_full": agreement(full, part),
        "ari_between_seeds": {name: agreement(name, name) for name in variants},
        "ari_same_seed_vs_default": {name: agreement(part, name) for name in variants
                                     if name not in (full, part)},
    }
    lines = [f"K-Means on {z.shape[0]} vectors (n = {args.n}, p = {z.shape[1]}, K = {args.k}), "
             f"{args.threads} thread(s), seeds 0-{args.seeds - 1}:", "",
             "| K-Means | seconds: median | inertia: mean (min - max) |", "|---|---:|---:|"]
    for name, rs in results.items():
        inertia = [r["inertia"] for r in rs]
        lines.append(f"| {name} | {np.median([r['seconds'] for r in rs]):.2f} | "
                     f"{np.mean(inertia):.5g} ({min(inertia):.5g} - {max(inertia):.5g}) |")
    lines += ["", f"Adjusted Rand index, two seeds of the full fit: mean "
              f"{np.mean(res['ari_between_seeds_full']):.3f}; the same seed, part + refinement "
              f"against the full fit: mean {np.mean(res['ari_same_seed_part_vs_full']):.3f}."]
    lines += ["", "Adjusted Rand index between seeds, per K-Means: " + "; ".join(
        f"{name}: mean {np.mean(v):.3f} ({min(v):.3f} - {max(v):.3f})"
        for name, v in res["ari_between_seeds"].items()) + "."]
    if res["ari_same_seed_vs_default"]:
        lines += ["", "The same seed against the default: " + "; ".join(
            f"{name}: mean {np.mean(v):.3f} ({min(v):.3f} - {max(v):.3f})"
            for name, v in res["ari_same_seed_vs_default"].items()) + "."]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
