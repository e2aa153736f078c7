"""How often Step 6's uncertain rule fires with no link between attention and confidence.

The rule tests every (prototype, class pair) with the prototype active in at least a
tenth of both classes, and flags those whose accumulated lead changes side at least twice
beyond 2 standard errors. ``whylook.explain.uncertain_by_chance`` (what ``whylook explain
--uncertain-null N`` runs) refits Step 5 with the run's own settings after cutting the
link two ways and applies the rule again: with every sample's confidence changes
multiplied by a random sign (all coefficients truly zero: what the rule flags is chance)
and with every sample's intensity changes given to another sample (one shuffle for all
transitions: the classes' and prototypes' average changes survive, and the ridge without
intercept credits them, so what it flags is that drift). This runs it on a finished run's
stored arrays, without redoing the analysis, and prints the tests, the flags on the real
data and under each null, and which real entries the shuffles flag too.

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

from whylook.explain import ExplainSettings, load_explanation, uncertain_by_chance
from whylook.structure import StructureSettings, UncertainPrototype, pair_confusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    exp = load_explanation(args.run)
    a, d = exp.arrays, exp.data
    recorded = d["settings"]
    settings = ExplainSettings(
        seed=recorded["seed"], ridge_lambda=recorded["ridge_lambda"],
        standard_errors=recorded["standard_errors"], bootstrap=recorded["bootstrap"],
        structure=StructureSettings(**d["structure_settings"]),
        uncertain_null=args.permutations,
    )
    classes = [str(c) for c in d["classes"]]
    steps = [int(c["step"]) for c in d["checkpoints"]]
    labels = a["labels"]
    active_rate = np.stack([a["active"][labels == c].mean(axis=0)
                            for c in range(len(classes))], axis=1)
    tests = sum(int(u) * (int(u) - 1) // 2 for u in
                (active_rate >= settings.structure.uncertain_min_rate).sum(axis=1))
    delta_p = np.diff(a["intensity"].astype(np.float64), axis=0)
    delta_y = np.diff(a["confidence"].astype(np.float64), axis=0)
    real = [(u["id"], *u["classes"]) for u in d["uncertain_prototypes"]]
    with threadpool_limits(1):
        null = uncertain_by_chance(delta_p, delta_y, active_rate, classes, steps, settings,
                                   flagged=real, progress=None)
    assert null is not None
    print(f"{len(classes)} classes, {tests} (prototype, pair) tests; flagged on the run: "
          f"{len(real)}")
    for name, counts in (("sign-flipped (chance)", null.sign_flipped),
                         ("shuffled (average drift)", null.shuffled)):
        print(f"  {name}: mean {statistics.mean(counts):.1f} (min {min(counts)}, max "
              f"{max(counts)}), {statistics.mean(counts) / tests:.2%} of the tests")
    print(f"  real entries flagged under shuffles too: {len(null.in_shuffles)} "
          f"({sum(c == len(null.shuffled) for c in null.in_shuffles.values())} under every one)")
    # Do the entries that the average drift flags too point at confused pairs more than
    # the rest? The lift of each half (pair_confusion, as explain's own check).
    drift = {key for key, c in null.in_shuffles.items() if 2 * c >= len(null.shuffled)}
    entries = [UncertainPrototype(u["id"], tuple(u["classes"]), u["swings"], (), (), ())
               for u in d["uncertain_prototypes"]]
    lifts = {}
    for name, part in (("in_half_the_shuffles", True), ("the_rest", False)):
        chosen = [u for u in entries if ((u.id, *u.classes) in drift) == part]
        lift = pair_confusion(a["confidence"], labels, classes, chosen).lift
        lifts[name] = {"entries": len(chosen), "lift": lift}
        print(f"  entries {name.replace('_', ' ')}: {len(chosen)}, lift {lift}")
    result: dict[str, Any] = {
        "machine": machine_info(1, torch.device("cpu")),
        "run": str(args.run), "classes": len(classes), "tests": tests, "flagged": len(real),
        **null.to_json(), "lift_by_drift": lifts, "settings": d["structure_settings"],
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
