"""What ``precision="bfloat16"`` changes in an explanation, against what the seed changes.

Usage::

    python benchmarks/bench_precision.py RUN [--seeds 0 1] [--planted] [--out FILE.json]

RUN is a trained run folder (e.g. the analysis benchmark's 12-checkpoint run under
``/tmp/whylook-bench-runs``). Each (precision, seed) explains its own copy of RUN, timed;
then :func:`whylook.compare` matches the prototypes of two explanations and reports how
much of their structure agrees. The float32-vs-bfloat16 pairs (same seed, so the same
analysis rows) are read against the float32-vs-float32 pair of two seeds: what the seed of
the sample choice and K-Means moves anyway. Same rows also give the saliency and
confidence arrays side by side.

``--planted`` also trains the planted-motif run of ``tests/test_planted.py`` and explains
it at analysis seeds 0-4 in both precisions, with that test's landing scores: the
strongest shared prototype of each class, and the two-variant class's variant markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import whylook  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def explain_copy(run: Path, dst: Path, precision: str, seed: int, **kw: Any
                 ) -> tuple[Any, float]:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("analysis", "report", "compare",
                                                            ".whylook.lock"))
    start = time.perf_counter()
    exp = whylook.explain(dst, seed=seed, progress=False,
                          settings=whylook.ExplainSettings(precision=precision), **kw)
    return exp, time.perf_counter() - start


def structure(exp: Any) -> dict[str, Any]:
    d = exp.data
    return {
        "uncertain_entries": len(d["uncertain_prototypes"]),
        "uncertain_prototypes": len({u["id"] for u in d["uncertain_prototypes"]}),
        "shared_per_class": float(np.mean([len(c["shared"]) for c in d["classes_explained"]])),
        "specialized_groups": sum(len(c["specialized"]) for c in d["classes_explained"]),
    }


def pair(a: tuple[str, Any], b: tuple[str, Any], out: Path) -> dict[str, Any]:
    res = whylook.compare(a[1].path.parent, b[1].path.parent, out=out / f"{a[0]}-{b[0]}.json",
                          device="cpu")
    d = res.data
    row: dict[str, Any] = {
        "a": a[0], "b": b[0],
        "matched": f"{d['matching']['n_matched']} of {d['matching']['k_a']}",
        "mean_iou": d["matching"]["mean_iou"],
        "beta_correlation": d["beta"]["mean"],
        "strategy_difference": d["strategy_difference"]["value"],
        "strategy_difference_random": d["strategy_difference"]["random_matching"],
        "shared_jaccard": d["shared_prototypes"]["mean_jaccard"],
        "learning_order_spearman": d["learning_order"]["spearman"],
    }
    ea, eb = a[1].arrays, b[1].arrays
    if np.array_equal(ea["sample_index"], eb["sample_index"]):
        sa, sb = ea["saliency"], eb["saliency"]
        row["saliency_correlation"] = float(np.corrcoef(sa.ravel(), sb.ravel())[0, 1])
        row["confidence_max_abs_diff"] = float(np.abs(ea["confidence"] - eb["confidence"]).max())
    return row


def bench_run(run: Path, seeds: list[int], work: Path) -> dict[str, Any]:
    exps: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for seed in seeds:
        for p in PRECISIONS:
            name = f"{p}-s{seed}"
            exps[name], seconds[name] = explain_copy(run, work / name / "run", p, seed)
            print(f"  explain {name}: {seconds[name]:.2f} s", flush=True)
    names = [f"{p}-s{s}" for s in seeds for p in PRECISIONS]
    pairs = [(f"float32-s{s}", f"bfloat16-s{s}") for s in seeds]
    if len(seeds) > 1:
        pairs += [(f"{p}-s{seeds[0]}", f"{p}-s{seeds[1]}") for p in PRECISIONS]
    rows = []
    for a, b in pairs:
        rows.append(pair((a, exps[a]), (b, exps[b]), work))
        print(f"  {a} vs {b}: {json.dumps(rows[-1])}", flush=True)
    return {"run": str(run), "seconds": seconds,
            "structure": {n: structure(exps[n]) for n in names}, "pairs": rows}


def bench_planted(work: Path, seeds: list[int]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_planted import _landing
    from whylook.synthetic import PLANTED_CLASSES, planted_dataset

    ds = planted_dataset(n_train=1600, n_test=400, seed=0)
    path = ds.save_npz(work / "planted.npz")
    run = whylook.train(f"npz:{path}", "smallcnn", epochs=3, checkpoints=10, batch_size=32,
                        seed=0, out=work / "planted-run", progress=False)
    names = list(PLANTED_CLASSES)
    two = names.index("H+F|G+I")
    out = []
    for p in PRECISIONS:
        for seed in seeds:
            exp, _ = explain_copy(run.path, work / f"planted-{p}-{seed}" / "run", p, seed,
                                  k=24, analysis_size=800)
            a = exp.arrays
            strongest = []
            for c, entry in enumerate(exp.data["classes_explained"]):
                motifs = sorted({m for alt in PLANTED_CLASSES[names[c]] for m in alt})
                strongest.append(round(_landing(ds, exp, c, int(entry["shared"][0][2:]), motifs), 3)
                                 if entry["shared"] else None)
            rows_c = np.flatnonzero(a["labels"] == two)
            variants = ds.train.variants[a["sample_index"][rows_c]]
            markers = []
            for spec in exp.data["classes_explained"][two]["specialized"]:
                in_group = a["class_groups"][rows_c] == spec["group"]
                share = np.bincount(variants[in_group], minlength=2) / in_group.sum()
                v = int(share.argmax())
                landing = (round(_landing(ds, exp, two, int(spec["prototypes"][0][2:]),
                                          PLANTED_CLASSES["H+F|G+I"][v], rows_c[in_group]), 3)
                           if share[v] >= 0.8 else None)
                markers.append({"variant": PLANTED_CLASSES["H+F|G+I"][v],
                                "purity": round(float(share[v]), 3), "landing": landing})
            out.append({"precision": p, "seed": seed, "strongest_shared_landing": strongest,
                        "variant_markers": markers})
            print(f"  planted {p} seed {seed}: {json.dumps(out[-1])}", flush=True)
    return {"runs": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--planted", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"command": "python benchmarks/bench_precision.py "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        res["run"] = bench_run(args.run, args.seeds, work)
        if args.planted:
            res["planted"] = bench_planted(work, [0, 1, 2, 3, 4])
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
