"""HDBSCAN of the patterns stage: whylook's neighbour search against scikit-learn's.

``whylook.patterns.find_patterns`` runs one HDBSCAN per transition and one per class.
``cluster`` picks the neighbour search per fit (``patterns.neighbour_search``: brute force
from ``BRUTE_MIN_DIM`` dimensions on, up to ``BRUTE_MAX_ROWS`` rows; scikit-learn's
default, a k-d tree, otherwise). This reruns exactly those fits on a run's stored
confidences and activity with that rule and with each algorithm forced on every fit, and
reports the time and whether the groups are the same as the rule's. ``brute`` builds an
n x n distance matrix per fit (32 MB at n = 2000, 800 MB at n = 10,000).

``--classes M`` times a synthetic M-class analysis instead of a run (12 checkpoints of
2000 samples whose softmax confidences drift in four planted patterns per transition, 32
prototype shares), for models with more classes than the data at hand; ``--samples`` and
``--checkpoints`` change its size, and ``--contenders`` leaves out the slow ones.

    python benchmarks/bench_hdbscan.py RUN                  # RUN/analysis/arrays.npz
    python benchmarks/bench_hdbscan.py RUN --threads 1 --repeats 5 --out results/hdb.json
    python benchmarks/bench_hdbscan.py --classes 100 --threads 1
    python benchmarks/bench_hdbscan.py --classes 1000 --samples 8192 --checkpoints 3 \
        --contenders rule auto --repeats 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bench_analysis import machine_info, write_result
from threadpoolctl import threadpool_limits

import whylook.patterns as patterns

#: "rule" is whylook's per-fit choice; the others are forced on every fit.
CONTENDERS = ("rule", "auto", "brute", "ball_tree")


def _time(arrays: dict[str, np.ndarray], contender: str, repeats: int, n_jobs: int):
    rule = patterns.neighbour_search
    if contender != "rule":
        patterns.neighbour_search = lambda n, d: contender  # type: ignore[assignment]
    try:
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = patterns.find_patterns(arrays["confidence"], arrays["labels"],
                                           profile=arrays["activity"], n_jobs=n_jobs)
            seconds.append(time.perf_counter() - t0)
    finally:
        patterns.neighbour_search = rule  # type: ignore[assignment]
    return seconds, found


def synthetic(m: int, n: int = 2000, checkpoints: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Confidences of an M-class model whose logits move in planted patterns."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % m
    logits = np.zeros((n, m))
    confidence = np.empty((checkpoints, n, m), np.float32)
    for t in range(checkpoints):
        if t:
            moves = rng.normal(0, 1.0, (4, m))[rng.integers(0, 4, n)]
            logits += moves + rng.normal(0, 0.1, (n, m))
            logits[np.arange(n), labels] += 0.5
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        confidence[t] = e / e.sum(axis=1, keepdims=True)
    activity = rng.dirichlet(np.ones(32), size=n)
    return {"confidence": confidence, "labels": labels, "activity": activity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", help="run folder with an analysis")
    parser.add_argument("--classes", type=int, help="time a synthetic M-class analysis instead")
    parser.add_argument("--samples", type=int, default=2000, help="with --classes: n")
    parser.add_argument("--checkpoints", type=int, default=12, help="with --classes: T+1")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                        help="the groups of each are compared with the first's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if (args.run is None) == (args.classes is None):
        parser.error("give a run folder or --classes M")
    torch.set_num_threads(args.threads)
    if args.run is not None:
        with np.load(args.run / "analysis" / "arrays.npz") as npz:
            arrays = {k: npz[k] for k in ("confidence", "labels", "activity")}
    else:
        arrays = synthetic(args.classes, n=args.samples, checkpoints=args.checkpoints)
    t1, n, m = arrays["confidence"].shape
    rows = []
    info = machine_info(args.threads, torch.device("cpu"))
    with threadpool_limits(args.threads):
        base = None
        for contender in args.contenders:
            seconds, found = _time(arrays, contender, args.repeats, args.threads)
            base = base or found
            same = bool(np.array_equal(found.groups, base.groups)
                        and np.array_equal(found.class_groups, base.class_groups))
            rows.append({"algorithm": contender, "median_s": float(np.median(seconds)),
                         "seconds": seconds, f"same_groups_as_{args.contenders[0]}": same,
                         "groups": int(found.n_groups_per_transition.sum()),
                         "class_groups": int(found.n_groups_per_class.sum())})
            print(f"{contender:>10}: {np.median(seconds):.3f} s (median of {args.repeats}), "
                  f"{rows[-1]['groups']} groups, {rows[-1]['class_groups']} class groups, "
                  f"same groups as {args.contenders[0]}: {same}", flush=True)
    result = {
        "machine": info,
        "run": str(args.run) if args.run else f"synthetic, {args.classes} classes",
        "transitions": t1 - 1, "n": n, "classes": m,
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
