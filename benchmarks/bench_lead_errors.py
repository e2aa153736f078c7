"""Step 5 and the uncertain rule at many classes: the leads' standard errors.

Step 6's uncertain rule reads, for every prototype and every pair of classes it is active
in, the standard error of the accumulated lead of one class over the other (from the
jackknife: each sample's moves of the lead summed over the transitions). This times
``fit_mapping`` and the rule on synthetic changes of ``T`` transitions, ``n`` samples,
``K`` prototypes and ``M`` classes (each prototype active in ``--active`` of the classes)
on one thread, and prints the peak memory of the process. It runs on any version of
whylook: where ``Mapping.lead_errors`` is missing (before 2026-12-05 evening) Step 5
computed every lead's error, ``(T, K, M, M)``, inside ``fit_mapping``, and the rule read
that array. One size per process, so that the peak memory is that size's.

    python benchmarks/bench_lead_errors.py --samples 10000 --classes 1000 [--out FILE]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
from bench_analysis import machine_info, write_result
from threadpoolctl import threadpool_limits

from whylook.mapping import fit_mapping
from whylook.structure import uncertain_rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--prototypes", type=int, default=32)
    ap.add_argument("--transitions", type=int, default=11)
    ap.add_argument("--active", type=float, default=0.3,
                    help="share of the classes each prototype is active in")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t, n, k, m = args.transitions, args.samples, args.prototypes, args.classes
    rng = np.random.default_rng(0)
    dp = rng.normal(size=(t, n, k))
    dy = rng.normal(size=(t, n, m)) * 0.01
    active = (rng.random((k, m)) < args.active).astype(np.float64)
    classes = [str(c) for c in range(m)]
    tests = int(sum(u * (u - 1) // 2 for u in active.sum(axis=1).astype(int)))
    with threadpool_limits(1):
        start = time.perf_counter()
        mapping = fit_mapping(dp, dy, n_jobs=1)
        fitted = time.perf_counter()
        errors = getattr(mapping, "lead_errors", None)
        if errors is None:
            errors = mapping.lead_se
        found = uncertain_rule(mapping.beta, mapping.beta_se, active, classes,
                               range(t + 1), None, errors)
        done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inputs = (dp.nbytes + dy.nbytes) / 2**20
    print(f"T={t}, n={n}, K={k}, M={m}, {tests} (prototype, pair) tests: Step 5 "
          f"{fitted - start:.2f} s, the rule {done - fitted:.2f} s, {len(found)} flagged; peak "
          f"RSS {peak:.0f} MiB (the changes themselves {inputs:.0f} MiB)")
    write_result(args.out, {
        "machine": machine_info(1, torch.device("cpu")),
        "sizes": {"transitions": t, "samples": n, "prototypes": k, "classes": m,
                  "active": args.active, "tests": tests},
        "step5_s": fitted - start, "rule_s": done - fitted, "flagged": len(found),
        "peak_rss_mib": peak, "inputs_mib": inputs,
        "lead_errors": hasattr(mapping, "lead_errors"),
    })


if __name__ == "__main__":
    main()
