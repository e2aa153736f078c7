"""How often Step 6's uncertain rule fires by chance: a permutation null on a finished run.

The rule tests every (prototype, class pair) with the prototype active in at least a
tenth of both classes, and flags those whose accumulated lead changes side at least twice
beyond 2 standard errors. This refits Step 5 (ridge, jackknife standard errors and the
lead's error, as ``explain`` does) after shuffling which sample's intensity changes go
with which sample's confidence changes (one permutation for all transitions, so each
sample keeps its trajectory) and applies the rule again: what it flags then is chance.
It prints the tests, the flags on the real data and the flags under each permutation.

    python benchmarks/uncertain_null.py RUN [--permutations 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_analysis import machine_info, write_result
from threadpoolctl import threadpool_limits

from whylook.explain import load_explanation
from whylook.mapping import fit_mapping
from whylook.structure import StructureSettings, assemble


def flags(delta_p: np.ndarray, arrays: dict[str, np.ndarray], classes: list[str],
          steps: list[int], settings: StructureSettings) -> int:
    """Prototype-pair entries the uncertain rule flags with these intensity changes."""
    delta_y = np.diff(arrays["confidence"].astype(np.float64), axis=0)
    mapping = fit_mapping(delta_p, delta_y, lam="cv", standard_errors="jackknife")
    found = assemble(classes=classes, steps=steps, labels=arrays["labels"],
                     activity=arrays["activity"], confidence=arrays["confidence"],
                     beta=mapping.beta, beta_se=mapping.beta_se,
                     class_groups=arrays["class_groups"], settings=settings,
                     lead_se=mapping.lead_se)
    return len(found.uncertain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = load_explanation(args.run)
    a, d = exp.arrays, exp.data
    settings = StructureSettings(**d["structure_settings"])
    classes = [str(c) for c in d["classes"]]
    steps = [int(c["step"]) for c in d["checkpoints"]]
    labels = a["labels"]
    m = len(classes)
    active_rate = np.stack([a["active"][labels == c].mean(axis=0) for c in range(m)], axis=1)
    tests = sum(int(u) * (int(u) - 1) // 2
                for u in (active_rate >= settings.uncertain_min_rate).sum(axis=1))
    delta_p = np.diff(a["intensity"].astype(np.float64), axis=0)
    rng = np.random.default_rng(args.seed)
    with threadpool_limits(1):
        real = flags(delta_p, a, classes, steps, settings)
        null = []
        for i in range(args.permutations):
            order = rng.permutation(delta_p.shape[1])
            null.append(flags(delta_p[:, order], a, classes, steps, settings))
            print(f"permutation {i + 1}: {null[-1]} flagged", flush=True)
    print(f"{m} classes, {tests} (prototype, pair) tests; flagged on the run: {real}; "
          f"under the null: mean {statistics.mean(null):.1f} (min {min(null)}, max "
          f"{max(null)}), {statistics.mean(null) / tests:.2%} of the tests")
    result: dict[str, Any] = {
        "machine": machine_info(1, torch.device("cpu")),
        "run": str(args.run), "classes": m, "tests": tests, "flagged": real,
        "flagged_null": null, "settings": d["structure_settings"],
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
