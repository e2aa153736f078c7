"""Run comparison: how different are the strategies of two runs that differ only in seed?

The paper reports that the order of the training data changes the learned strategy.
Prototype ids mean nothing across runs (each run clusters its own features), so the two
runs' prototypes are first *matched*, then their use is compared:

1. **Matching.** Both runs' prototypes are assigned on the *same* images: the analysis
   rows the two explanations share (``sample_index``), or, when they share too few, run
   B's prototypes are assigned with B's final model on A's analysis rows. The overlap of
   prototype ``p`` of A and ``q`` of B is the IoU of their assignment masks over all
   positions of those images; the Hungarian algorithm
   (:func:`scipy.optimize.linear_sum_assignment`) finds the one-to-one matching with the
   largest total IoU. Matches below ``min_iou`` count as unmatched.
2. **β trajectories.** For each matched pair, the Pearson correlation of
   ``β_A[:, p, :]`` and ``β_B[:, q, :]`` over all transitions and classes; compared with
   the same correlation over arbitrary (unmatched) pairs as a baseline.
3. **Shared prototypes per class.** The Jaccard index of A's shared set (mapped through
   the matching) and B's shared set, per class.
4. **Confusion matrices** of both final models on the test split: the normalised L1
   distance of their off-diagonal parts (0 = same errors, 1 = disjoint errors) and the
   Spearman correlation of the per-pair confusion counts.
5. **Learning order.** Spearman correlation of the checkpoint at which each class pair is
   separated in A and in B.

**Strategy difference** (one number): the support of prototype ``p`` for class ``c``,
``S[p, c] = Σ_t β^t[p, c]``, is how a run uses its evidence. For each class, correlate
A's support profile over the matched prototypes with B's; the strategy difference is
``1 − mean over classes of that correlation``: 0 when both runs lean on the same
(matched) prototypes in the same proportions, about 1 when they are unrelated. It is
reported next to the value under random matchings, which is what "unrelated" looks like
for these two runs.

Both β readings (2 and the strategy difference) are also reported per typical attention
change (``beta_per_sd``, ``strategy_difference_per_sd``): ``β^t[k, :]`` times the standard
deviation over samples of prototype ``k``'s intensity change at transition ``t``. Raw β is
per unit of raw Grad-CAM, whose changes grow by an order of magnitude during training, so
raw β weighs the first transitions most (docs/METHOD-NOTES.md, "Run comparison").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from scipy.optimize import linear_sum_assignment

from whylook._checks import is_whole_valued
from whylook._io import file_digest, run_lock, write_json
from whylook.errors import WhylookError
from whylook.finetune import _open, evaluate, load_prototypes, require_explanation
from whylook.models import resolve_device
from whylook.structure import order_correlation_of, records_separation

__all__ = [
    "SCHEMA",
    "Comparison",
    "beta_correlations",
    "compare",
    "confusion_difference",
    "mask_iou",
    "match_prototypes",
    "shared_jaccard",
    "strategy_difference",
]

SCHEMA = "whylook.compare/1"
#: Runs must agree on these to be comparable at all.
_SAME_KEYS = ("model", "data", "layer")


def mask_iou(assign_a: np.ndarray, assign_b: np.ndarray, k_a: int, k_b: int) -> np.ndarray:
    """``(k_a, k_b)`` IoU of every prototype pair's assignment masks on the same images.

    Example:
        >>> a = np.array([[[0, 0], [1, 1]]])
        >>> b = np.array([[[1, 1], [1, 0]]])
        >>> mask_iou(a, b, 2, 2).round(3).tolist()
        [[0.0, 0.667], [0.5, 0.25]]
    """
    a = np.asarray(assign_a, np.int64).ravel()
    b = np.asarray(assign_b, np.int64).ravel()
    if a.shape != b.shape:
        raise WhylookError(
            f"assignments of the two runs differ in shape ({np.shape(assign_a)} vs "
            f"{np.shape(assign_b)}); compare runs with the same model and layer"
        )
    both = np.bincount(a * k_b + b, minlength=k_a * k_b).reshape(k_a, k_b).astype(np.float64)
    union = both.sum(1, keepdims=True) + both.sum(0, keepdims=True) - both
    return np.divide(both, union, out=np.zeros_like(both), where=union > 0)


def match_prototypes(iou: np.ndarray) -> list[tuple[int, int, float]]:
    """Hungarian matching with the largest total IoU: ``[(p, q, iou)]``, by ``p``.

    Example:
        >>> match_prototypes(np.array([[0.1, 0.9], [0.8, 0.2]]))
        [(0, 1, 0.9), (1, 0, 0.8)]
    """
    rows, cols = linear_sum_assignment(-np.asarray(iou, np.float64))
    return [(int(p), int(q), float(iou[p, q])) for p, q in zip(rows, cols, strict=True)]


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def beta_correlations(
    beta_a: np.ndarray, beta_b: np.ndarray, pairs: list[tuple[int, int]]
) -> list[float | None]:
    """Pearson correlation of ``β_A[:, p, :]`` and ``β_B[:, q, :]`` for each ``(p, q)``.

    Example:
        >>> b = np.arange(12.0).reshape(2, 2, 3)
        >>> beta_correlations(b, b, [(0, 0), (1, 1)])
        [1.0, 1.0]
    """
    if beta_a.shape[0] != beta_b.shape[0] or beta_a.shape[2] != beta_b.shape[2]:
        raise WhylookError(
            f"β of the two runs have {beta_a.shape[0]} and {beta_b.shape[0]} transitions; "
            "compare runs trained with the same number of checkpoints"
        )
    return [_corr(beta_a[:, p, :], beta_b[:, q, :]) for p, q in pairs]


def shared_jaccard(
    shared_a: dict[str, list[str]], shared_b: dict[str, list[str]], a_to_b: dict[str, str]
) -> dict[str, float | None]:
    """Per class, Jaccard of A's shared prototypes (mapped to B's ids) and B's.

    A prototype of A without a match maps to nothing and so counts as not shared by B.
    ``None`` where neither run has a shared prototype for the class.

    Example:
        >>> shared_jaccard({"7": ["P-1", "P-2"]}, {"7": ["P-5"]}, {"P-1": "P-5"})
        {'7': 0.5}
    """
    out: dict[str, float | None] = {}
    for c, ids in shared_a.items():
        sa = {a_to_b.get(p, f"unmatched:{p}") for p in ids}
        sb = set(shared_b.get(c, []))
        union = sa | sb
        out[c] = None if not union else len(sa & sb) / len(union)
    return out


def confusion_difference(conf_a: np.ndarray, conf_b: np.ndarray) -> dict[str, Any]:
    """How different the errors of two models are, from their ``(M, M)`` confusions.

    ``l1``: Σ|A−B| over off-diagonal cells / (errors of A + errors of B), in [0, 1].
    ``pair_spearman``: rank correlation of the per-pair counts ``C[a,b] + C[b,a]``.

    Example:
        >>> c = np.array([[9, 1], [0, 10]])
        >>> confusion_difference(c, c)["l1"]
        0.0
    """
    a, b = np.asarray(conf_a, np.int64), np.asarray(conf_b, np.int64)
    off = ~np.eye(a.shape[0], dtype=bool)
    total = a[off].sum() + b[off].sum()
    l1 = float(np.abs(a - b)[off].sum() / total) if total else 0.0
    pa = np.array([a[i, j] + a[j, i] for i, j in combinations(range(a.shape[0]), 2)])
    pb = np.array([b[i, j] + b[j, i] for i, j in combinations(range(a.shape[0]), 2)])
    rho = None
    if len(pa) >= 3 and np.ptp(pa) > 0 and np.ptp(pb) > 0:
        rho = float(stats.spearmanr(pa, pb).statistic)
    return {
        "l1": round(l1, 6),
        "pair_spearman": None if rho is None else round(rho, 6),
        "errors_a": int(a[off].sum()),
        "errors_b": int(b[off].sum()),
    }


def strategy_difference(
    support_a: np.ndarray, support_b: np.ndarray, pairs: list[tuple[int, int]]
) -> tuple[float | None, dict[int, float]]:
    """``1 − mean_c corr(S_A[P, c], S_B[Q, c])`` over the matched prototypes ``(P, Q)``.

    ``S`` is the support ``Σ_t β^t`` ``(K, M)``. Returns the number and the per-class
    correlations (classes with constant support in either run are left out).

    Example:
        >>> s = np.array([[1.0, -1.0], [0.0, 2.0], [3.0, 0.5]])
        >>> strategy_difference(s, s, [(0, 0), (1, 1), (2, 2)])[0]
        0.0
    """
    p = [x for x, _ in pairs]
    q = [y for _, y in pairs]
    per_class = {}
    for c in range(support_a.shape[1]):
        r = _corr(support_a[p, c], support_b[q, c])
        if r is not None:
            per_class[c] = r
    if not per_class:
        return None, {}
    return float(1.0 - np.mean(list(per_class.values()))), per_class


def _attention_sd(intensity: np.ndarray) -> np.ndarray:
    """``(T, K, 1)``: the spread over samples of each prototype's intensity change."""
    return np.diff(intensity.astype(np.float64), axis=0).std(axis=1)[:, :, None]


def _beta_agreement(
    beta_a: np.ndarray,
    beta_b: np.ndarray,
    good: list[tuple[int, int]],
    base_pairs: list[tuple[int, int]],
    random_pairs: list[list[tuple[int, int]]],
) -> dict[str, Any]:
    """β-trajectory correlations and the strategy difference, with their baselines."""
    support_a, support_b = beta_a.sum(0), beta_b.sum(0)
    diff, per_class = strategy_difference(support_a, support_b, good)
    random_diffs = [d for pairs in random_pairs
                    if (d := strategy_difference(support_a, support_b, pairs)[0]) is not None]
    return {
        "correlations": beta_correlations(beta_a, beta_b, good),
        "baseline": [c for c in beta_correlations(beta_a, beta_b, base_pairs) if c is not None],
        "difference": diff,
        "per_class": per_class,
        "random_differences": random_diffs,
    }


def _r6(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _beta_json(agreement: dict[str, Any]) -> dict[str, Any]:
    valid = [c for c in agreement["correlations"] if c is not None]
    base = agreement["baseline"]
    return {
        "mean": _r6(np.mean(valid)) if valid else None,
        "median": _r6(np.median(valid)) if valid else None,
        "baseline_mean": _r6(np.mean(base)) if base else None,
    }


def _strategy_json(agreement: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    randoms = agreement["random_differences"]
    return {
        "value": _r6(agreement["difference"]),
        "random_matching": _r6(np.mean(randoms)) if randoms else None,
        "per_class": {classes[c]: round(r, 6) for c, r in agreement["per_class"].items()},
    }


@dataclass(frozen=True, eq=False)
class Comparison:
    """The result of :func:`compare`; ``summary()`` is what the CLI prints."""

    path: Path | None
    data: dict[str, Any] = field(repr=False)

    @property
    def strategy_difference(self) -> float | None:
        return self.data["strategy_difference"]["value"]

    def summary(self) -> str:
        d = self.data
        m = d["matching"]
        b = d["beta"]
        sd = d["strategy_difference"]
        conf = d["confusion"]
        lo = d["learning_order"]

        def num(x: float | None, fmt: str = "+.3f") -> str:
            return "n/a" if x is None else format(x, fmt)

        lines = [
            f"whylook compare: {d['run_a']['name']} vs {d['run_b']['name']} "
            "(differ in: "
            f"{', '.join(d['config_differences']) or 'nothing their run.json files record'})",
            f"prototypes matched on {m['n_images']} common images ({m['rows']}): "
            f"{m['n_matched']} of {m['k_a']}×{m['k_b']} with IoU ≥ {m['min_iou']:g}, mean "
            f"matched IoU {m['mean_iou']:.3f}",
            f"β trajectories of matched prototypes: mean correlation {num(b['mean'])} "
            f"(median {num(b['median'])}; arbitrary pairs {num(b['baseline_mean'])})",
            f"strategy difference = {num(sd['value'], '.3f')} (0 = same support profile per "
            f"class over matched prototypes; random matching gives "
            f"{num(sd['random_matching'], '.3f')})",
        ]
        if sd["per_class"]:
            worst = sorted(sd["per_class"].items(), key=lambda kv: kv[1])[:3]
            lines.append(
                "  classes whose strategies differ most: "
                + ", ".join(f"{c} (r={r:+.2f})" for c, r in worst)
            )
        bs, ss = d.get("beta_per_sd"), d.get("strategy_difference_per_sd")
        if bs and ss:
            lines.append(
                f"  per typical attention change (β x s.d. of ΔP): β correlation "
                f"{num(bs['mean'])} (arbitrary pairs {num(bs['baseline_mean'])}), strategy "
                f"difference {num(ss['value'], '.3f')} (random matching "
                f"{num(ss['random_matching'], '.3f')})"
            )
        jac = d["shared_prototypes"]
        lines.append(
            f"shared prototypes per class: mean Jaccard {num(jac['mean_jaccard'], '.3f')} "
            f"over {jac['n_classes']} classes with any shared prototype"
        )
        lines.append(
            f"test confusions: {conf['errors_a']} vs {conf['errors_b']} errors; off-diagonal "
            f"L1 difference {conf['l1']:.3f}, per-pair Spearman {num(conf['pair_spearman'])}"
        )
        lines.append(
            f"learning order: Spearman of separation checkpoints across runs "
            f"{num(lo['spearman'])}; distinctness-vs-separation per run "
            f"{num(lo['correlation_a'])} / {num(lo['correlation_b'])}"
        )
        if self.path is not None:
            lines.append(f"written to {self.path}")
        return "\n".join(lines)


def _check_comparable(fa: Any, fb: Any, ea: Any, eb: Any) -> list[str]:
    ca, cb = [str(c) for c in ea.data["classes"]], [str(c) for c in eb.data["classes"]]
    if ca != cb:
        raise WhylookError(
            f"the runs have different classes ({', '.join(ca[:5])}… vs {', '.join(cb[:5])}…); "
            "compare runs of the same data"
        )
    da, db = ((f.manifest.get("data") or {}).get("digest") for f in (fa, fb))
    for key in _SAME_KEYS:
        va = ea.data["run"].get(key) if key == "layer" else fa.config.get(key)
        vb = eb.data["run"].get(key) if key == "layer" else fb.config.get(key)
        if key == "data" and da is not None and da == db:
            continue  # the same images by content, read from another path (a zip, a copy)
        if va != vb:
            raise WhylookError(
                f"the runs differ in {key} ({va!r} vs {vb!r}); compare runs that differ only in "
                "seed"
            )
    if ea.data["grid"] != eb.data["grid"]:
        raise WhylookError(
            f"the runs' prototype grids differ ({ea.data['grid']} vs "
            f"{eb.data['grid']}); explain both at the same layer"
        )
    if len(ea.data["checkpoints"]) != len(eb.data["checkpoints"]):
        raise WhylookError(
            f"the runs have {len(ea.data['checkpoints'])} and {len(eb.data['checkpoints'])} "
            "checkpoints; compare runs with the same number of checkpoints"
        )
    # What the runs were made with: the config plus the seeds (run.json keeps them apart).
    made_a = {**fa.config, **(fa.manifest.get("seeds") or {})}
    made_b = {**fb.config, **(fb.manifest.get("seeds") or {})}
    same_images = da is not None and da == db
    return [
        f"{k} {made_a.get(k)!r} vs {made_b.get(k)!r}"
        + (" (the same images)" if k == "data" and same_images else "")
        for k in sorted(set(made_a) | set(made_b))
        if made_a.get(k) != made_b.get(k)
    ]


def _common_assignments(
    fa: Any, fb: Any, ea: Any, eb: Any, device: str
) -> tuple[np.ndarray, np.ndarray, str]:
    sa, sb = ea.arrays["sample_index"], eb.arrays["sample_index"]
    common, ia, ib = np.intersect1d(sa, sb, return_indices=True)
    if len(common) >= 0.5 * min(len(sa), len(sb)):
        return (
            ea.arrays["assignments"][ia],
            eb.arrays["assignments"][ib],
            "analysis rows shared by both explanations",
        )
    # Too few shared rows: assign B's prototypes, through B's own final model, on A's rows.
    from whylook.saliency import layer_features

    protos = load_prototypes(fb, eb, device=device)
    model = fb.load_model(len(fb.checkpoints) - 1, device=str(resolve_device(device)))
    images = fb.data().train.images[sa]
    assign_b = np.concatenate(
        [protos.assign(f)
         for f in layer_features(model, eb.data["layer"], images, precision=eb.precision)]
    )
    return ea.arrays["assignments"], assign_b, "A's analysis rows, B's prototypes reassigned"


def compare(
    run_a: str | Path | Any,
    run_b: str | Path | Any,
    *,
    out: str | Path | None = None,
    min_iou: float = 0.1,
    device: str = "auto",
    random_matchings: int = 200,
) -> Comparison:
    """Compare the strategies of two explained runs (see the module docstring).

    Args:
        run_a, run_b: run folders that differ only in seed (data order, initialisation).
        out: a ``.json`` file, or a folder for ``compare.json``; default
            ``RUN_A/compare/<name of RUN_B>.json``.
        min_iou: matches with a lower IoU count as unmatched.
        random_matchings: random matchings for the strategy-difference baseline.

    Example:
        >>> res = compare("runs/seed0", "runs/seed1")  # doctest: +SKIP
        >>> print(res.summary())  # doctest: +SKIP
    """
    fa, fb = _open(run_a), _open(run_b)
    # A's lock from its explanation's read to the write of the result into A: an explain of
    # A meanwhile would otherwise leave a comparison of an explanation A no longer has.
    with run_lock(fa.path):
        return _compare(fa, fb, out=out, min_iou=min_iou, device=device,
                        random_matchings=random_matchings)


def _compare(fa: Any, fb: Any, *, out: str | Path | None, min_iou: float, device: str,
             random_matchings: int) -> Comparison:
    ea, eb = require_explanation(fa), require_explanation(fb)
    differences = _check_comparable(fa, fb, ea, eb)
    dev = resolve_device(device)
    classes = [str(c) for c in ea.data["classes"]]
    m, ka, kb = len(classes), ea.k, eb.k

    assign_a, assign_b, rows_how = _common_assignments(fa, fb, ea, eb, str(dev))
    iou = mask_iou(assign_a, assign_b, ka, kb)
    matches = match_prototypes(iou)
    good = [(p, q) for p, q, v in matches if v >= min_iou]
    a_to_b = {f"P-{p}": f"P-{q}" for p, q in good}

    beta_a, beta_b = ea.arrays["beta"].astype(np.float64), eb.arrays["beta"].astype(np.float64)
    # Baselines: arbitrary (p, q) pairs and random matchings, to show what "unrelated" looks
    # like; drawn once, so that both readings of β below are measured against the same ones.
    rng = np.random.default_rng(0)
    base_pairs = list(
        zip(rng.integers(0, ka, 500).tolist(), rng.integers(0, kb, 500).tolist(), strict=True)
    )
    random_pairs = [
        [(p, int(q)) for (p, _), q in zip(good, rng.permutation(kb)[: len(good)], strict=True)]
        for _ in range(random_matchings if good else 0)
    ]
    raw = _beta_agreement(beta_a, beta_b, good, base_pairs, random_pairs)
    corrs = raw["correlations"]
    # The same per typical attention change (β x s.d. of ΔP at each transition): raw β is
    # largest at the first steps, where attention barely moves (report, METHOD-NOTES Step 5).
    scaled = None
    if "intensity" in ea.arrays and "intensity" in eb.arrays:
        scaled = _beta_agreement(beta_a * _attention_sd(ea.arrays["intensity"]),
                                 beta_b * _attention_sd(eb.arrays["intensity"]),
                                 good, base_pairs, random_pairs)

    def shared(e: Any) -> dict[str, list[str]]:
        return {str(c["class"]): list(c["shared"]) for c in e.data["classes_explained"]}

    jac = shared_jaccard(shared(ea), shared(eb), a_to_b)
    defined = [v for v in jac.values() if v is not None]

    data_a = fa.data()
    confs = []
    for folder in (fa, fb):
        model = folder.load_model(len(folder.checkpoints) - 1, device=str(dev))
        acc, _, conf = evaluate(model, data_a.test.images, data_a.test.labels, m, device=dev)
        confs.append((acc, conf))
    conf_diff = confusion_difference(confs[0][1], confs[1][1])

    def order(e: Any) -> dict[tuple[str, str], int]:
        late = len(e.data["checkpoints"])

        def when(p: dict[str, Any]) -> int:
            # Separated as every reader counts it (records_separation); never: ranked last.
            at = p.get("separated_at_checkpoint")
            return int(at) if records_separation(p) and is_whole_valued(at) else late

        return {(str(p["pair"][0]), str(p["pair"][1])): when(p) for p in e.data["learning_order"]}

    oa, ob = order(ea), order(eb)
    keys = sorted(set(oa) & set(ob))
    va, vb = np.array([oa[k] for k in keys]), np.array([ob[k] for k in keys])
    lo_rho = None
    if len(keys) >= 3 and np.ptp(va) > 0 and np.ptp(vb) > 0:
        lo_rho = float(stats.spearmanr(va, vb).statistic)

    result = {
        "schema": SCHEMA,
        "run_a": {
            "name": fa.path.name,
            "path": str(fa.path),
            "k": ka,
            "test_accuracy": round(confs[0][0], 6),
            # The report tells a comparison of an earlier explanation by this.
            "explanation_sha256": file_digest(fa.path / "analysis" / "explanation.json"),
        },
        "run_b": {
            "name": fb.path.name,
            "path": str(fb.path),
            "k": kb,
            "test_accuracy": round(confs[1][0], 6),
            "explanation_sha256": file_digest(fb.path / "analysis" / "explanation.json"),
        },
        "classes": classes,
        "config_differences": differences,
        "matching": {
            "rows": rows_how,
            "n_images": int(assign_a.shape[0]),
            "k_a": ka,
            "k_b": kb,
            "min_iou": min_iou,
            "n_matched": len(good),
            "mean_iou": round(float(np.mean([v for *_, v in matches if v >= min_iou])), 6)
            if good
            else 0.0,
            "pairs": [
                {
                    "a": f"P-{p}",
                    "b": f"P-{q}",
                    "iou": round(v, 6),
                    "beta_correlation": _r6(corrs[good.index((p, q))]) if (p, q) in good else None,
                }
                for p, q, v in matches
            ],
        },
        "beta": {
            **_beta_json(raw),
            "definition": "Pearson correlation of beta[:, p, :] (A) and beta[:, q, :] "
            "(B) over transitions x classes, per matched pair",
        },
        "strategy_difference": {
            **_strategy_json(raw, classes),
            "definition": "1 - mean over classes of the Pearson correlation between the two "
            "runs' support (sum over t of beta) for the class, over matched "
            "prototypes; 0 = same strategy, ~1 = unrelated",
        },
        # Both again with beta per typical attention change; null without intensities.
        "beta_per_sd": None if scaled is None else {
            **_beta_json(scaled),
            "definition": "as beta, with beta[t, k, :] multiplied by the standard deviation "
            "of prototype k's intensity change at transition t over the run's analysis set",
        },
        "strategy_difference_per_sd": None if scaled is None else {
            **_strategy_json(scaled, classes),
            "definition": "as strategy_difference, from beta per typical attention change",
        },
        "shared_prototypes": {
            "jaccard": {c: _r6(v) for c, v in jac.items()},
            "mean_jaccard": _r6(float(np.mean(defined))) if defined else None,
            "n_classes": len(defined),
        },
        "confusion": {**conf_diff, "a": confs[0][1].tolist(), "b": confs[1][1].tolist()},
        "learning_order": {
            "spearman": _r6(lo_rho),
            "n_pairs": len(keys),
            "correlation_a": order_correlation_of(ea.data)[1],
            "correlation_b": order_correlation_of(eb.data)[1],
        },
    }
    if out is None:
        path = fa.path / "compare" / f"{fb.path.name}.json"
    else:
        out = Path(out)
        path = out if out.suffix == ".json" else out / "compare.json"
    write_json(path, result)
    return Comparison(path=path, data=result)
