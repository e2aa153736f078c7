"""Step 7: perturbation fine-tuning from the uncertain prototypes.

The explanation names *uncertain* prototypes: evidence whose support swings between two
classes ``(a, b)`` across the checkpoints. The paper removes the training samples that
contain such a prototype, fine-tunes on what is left, then on the full set, and reports
fewer ``a↔b`` confusions with less variance over seeds. This module runs that experiment
on any run folder.

The rules, as this module pins them down (every value is recorded in ``finetune.json``):

* **Pair.** ``pair="a,b"`` names it; ``pair="auto"`` takes, among the pairs that have an
  uncertain prototype, the one with the most test-set confusions (``C[a,b] + C[b,a]``) at
  the final checkpoint. A pair without an uncertain prototype is refused: its curated set
  would equal the full set, and the experiment would measure nothing.
* **Curated set.** The training split minus every sample ``i`` that *contains* one of the
  pair's uncertain prototypes ``p``: ``p`` is active in ``i`` by the explanation's own
  rule (its final-checkpoint activity, :func:`whylook.intensity.activity` with the
  explanation's ``active_rule``, is at least its ``active_threshold``) and, by default,
  ``i`` belongs to one of the two classes ``p`` swings between (docs/METHOD-NOTES.md,
  Step 7). That needs the prototype assignments and final saliency for the *whole*
  training split; they are computed in shards and cached under ``RUN/finetune/cache``.
* **Strategies.** ``"full>full"``, ``"curated>curated"``, ``"curated>full"``, ``"full"``,
  ``"curated"``: one epoch per stage, on the named set. Each starts from the final
  checkpoint θ_T with a fresh optimizer, carried across its stages.
* **Seeds.** A seed fixes the data order and dropout, nothing else. The order of stage
  ``j`` is one permutation of the whole training split drawn from ``(seed, j)``; a
  curated stage visits the same permutation with the removed samples skipped. So with
  one seed, all strategies start from the same weights and their stage-2 epochs see the
  same order: ``curated>full`` and ``full>full`` differ only in what stage 1 removed.
  Because a strategy's result depends only on its stages and the seed, strategies that
  share a first stage share its computation (``full`` is the first half of ``full>full``).
* **Measures.** Test accuracy and the pair's confusion count ``C[a,b] + C[b,a]`` on the
  test split (rows = true class), as mean ± sample standard deviation (ddof = 1) over
  seeds, plus the paired difference of each strategy to ``full>full`` (same seeds).
* **Resuming.** Each (strategy, seed) result, with its whole test confusion matrix, is
  cached under ``RUN/finetune/cache``; a strategy without a curated stage is keyed without
  the curated set, so trying another pair or rule reruns only the curated strategies.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from whylook import __version__
from whylook._checks import is_whole
from whylook._io import (
    file_digest,
    read_json,
    remove_temporaries,
    run_lock,
    save_npz,
    write_bytes,
    write_json,
)
from whylook._progress import progress_bar
from whylook.errors import WhylookError, option
from whylook.models import resolve_device, rng_kept
from whylook.structure import confusion_matrix

__all__ = [
    "DEFAULT_STRATEGIES",
    "SCHEMA",
    "CuratedSet",
    "FinetuneResult",
    "StrategyResult",
    "active_rule",
    "choose_pair",
    "confusion_count",
    "confusion_matrix",
    "curated_mask",
    "evaluate",
    "finetune",
    "load_prototypes",
    "parse_strategy",
    "require_explanation",
    "stage_order",
    "training_activity",
]

SCHEMA = "whylook.finetune/1"
SETS = ("full", "curated")
DEFAULT_STRATEGIES = ("full>full", "curated>curated", "curated>full", "full", "curated")
#: The most seeds a count may ask for (each is a fine-tuning of every strategy).
MAX_SEEDS = 1000
# Bump when the fine-tuning or the curated-set computation changes for the same inputs.
_CACHE_VERSION = "2"
_SHARD = 8192


# --------------------------------------------------------------------------- small parts


def parse_strategy(text: str) -> tuple[str, ...]:
    """``"curated>full"`` -> ``("curated", "full")``: one epoch per stage, in order.

    ``→`` is accepted for ``>``, so the paper's spelling works too.

    >>> parse_strategy("curated>full")
    ('curated', 'full')
    >>> parse_strategy(" full ")
    ('full',)
    """
    stages = tuple(s.strip() for s in str(text).replace("→", ">").split(">"))
    if not stages or any(s not in SETS for s in stages):
        raise WhylookError(
            f"unknown strategy {text!r}; a strategy is stages joined by '>', each 'full' or "
            "'curated' (e.g. curated>full)"
        )
    return stages


def _label(stages: Sequence[str]) -> str:
    return "→".join(stages)


def confusion_count(confusion: np.ndarray, a: int, b: int) -> int:
    """The pair's confusions both ways: ``C[a, b] + C[b, a]`` (rows = true class).

    >>> confusion_count(np.array([[50, 3, 0], [1, 40, 2], [0, 7, 30]]), 1, 2)
    9
    """
    c = np.asarray(confusion)
    if a == b:
        raise WhylookError(f"a confusion pair needs two different classes, not {a} twice")
    return int(c[a, b] + c[b, a])


def stage_order(n: int, seed: int, stage: int, keep: np.ndarray | None = None) -> np.ndarray:
    """The visiting order of fine-tuning stage ``stage`` (0-based) under ``seed``.

    One permutation of all ``n`` training rows per ``(seed, stage)``; a curated stage
    (``keep`` given) visits the same permutation with the removed rows skipped, so the
    curated and full epochs of one seed differ only in the removed samples.

    >>> stage_order(6, seed=0, stage=0).tolist() == stage_order(6, 0, 0).tolist()
    True
    >>> keep = np.array([True, False, True, True, False, True])
    >>> full, cur = stage_order(6, 0, 0), stage_order(6, 0, 0, keep)
    >>> cur.tolist() == [i for i in full.tolist() if keep[i]]
    True
    """
    perm = np.random.default_rng([int(seed), int(stage)]).permutation(int(n))
    return perm if keep is None else perm[np.asarray(keep, bool)[perm]]


def _seed_list(seeds: object) -> list[int]:
    """``seeds`` as given to :func:`finetune` (a count, or the seeds), checked."""
    from whylook.train import MAX_SEED

    if is_whole(seeds):
        count = int(seeds)
        if not 1 <= count <= MAX_SEEDS:
            raise WhylookError(
                f"seeds must be a count from 1 to {MAX_SEEDS} or a list of seeds, not {count}"
            )
        return list(range(count))
    values = list(seeds) if isinstance(seeds, list | tuple | range | np.ndarray) else None
    if (not values or not all(is_whole(v) and 0 <= v <= MAX_SEED for v in values)
            or len(set(values)) != len(values)):
        raise WhylookError(
            f"seeds must be a count from 1 to {MAX_SEEDS} or distinct whole numbers from 0 to "
            f"{MAX_SEED}, not {seeds!r}"
        )
    return [int(v) for v in values]


def _torch_seed(seed: int, stage: int) -> int:
    # Dropout (and any other torch randomness) of a stage: a function of (seed, stage) only.
    return int(np.random.SeedSequence([int(seed), int(stage), 1]).generate_state(1)[0])


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- inputs


def require_explanation(run: Any) -> Any:
    """The run's :class:`whylook.explain.Explanation`, or a one-line error saying to run
    ``whylook explain`` first."""
    from whylook.explain import load_explanation

    return load_explanation(run)


def _open(run: Any) -> Any:
    from whylook.run import RunFolder

    return run if isinstance(run, RunFolder) else RunFolder.open(run)


def load_prototypes(run: Any, explanation: Any = None, *, device: str = "auto") -> Any:
    """The fitted prototypes (:class:`whylook.prototypes.Prototypes`) of a run's explanation.

    ``whylook explain`` caches them under ``RUN/analysis/cache/prototypes-*.npz``; a folder
    can hold several (one per K, layer or seed tried). The right one is found by content:
    it is the one whose assignments of the final model's features reproduce the stored
    ``assignments`` of the analysis set. That check also guards against a cache that no
    longer matches the explanation.

    Example:
        >>> protos = load_prototypes("runs/mnist")  # doctest: +SKIP
        >>> protos.k  # doctest: +SKIP
        32
    """
    from whylook.prototypes import Prototypes
    from whylook.saliency import layer_features

    folder = _open(run)
    exp = explanation if explanation is not None else require_explanation(folder)
    candidates = sorted((folder.path / "analysis" / "cache").glob("prototypes-*.npz"))
    again = f"rerun `whylook explain {folder.path}` to restore them"
    if not candidates:
        raise WhylookError(
            f"the prototypes of {folder.path} are not in its analysis cache; {again}"
        )
    rows = exp.arrays["sample_index"][:256]
    stored = exp.arrays["assignments"][: len(rows)]
    model = folder.load_model(len(folder.checkpoints) - 1, device=str(resolve_device(device)))
    feats = torch.cat(
        list(layer_features(model, exp.data["layer"], folder.data().train.images[rows],
                            precision=exp.precision))
    )
    best, best_agree = None, -1.0
    for path in candidates:
        with np.load(path) as z:
            protos = Prototypes.from_arrays(dict(z))
        if protos.k != exp.k or protos.d != feats.shape[1]:
            continue
        agree = float((protos.assign(feats) == stored).mean())
        if agree > best_agree:
            best, best_agree = protos, agree
    # Exact agreement is expected; a tolerance absorbs float ties between batch layouts.
    if best is None or best_agree < 0.99:
        raise WhylookError(
            f"no cached prototypes of {folder.path} reproduce its explanation's assignments; "
            f"{again}"
        )
    return best


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    m: int,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> tuple[float, float, np.ndarray]:
    """``(accuracy, mean cross-entropy, confusion (M, M))`` of ``model`` on a split.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> acc, loss, conf = evaluate(net, np.zeros((3, 1, 2, 2), np.uint8),
        ...                            np.array([0, 1, 1]), 2)
        >>> conf.sum()
        np.int64(3)
    """
    from whylook.data import to_tensor

    device = resolve_device(device)
    if not is_whole(batch_size) or batch_size < 1:
        raise WhylookError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
    was_training = model.training
    model.eval()
    preds, loss_sum = [], 0.0
    try:
        with torch.no_grad():
            for lo in range(0, len(labels), batch_size):
                x = to_tensor(np.asarray(images[lo : lo + batch_size])).to(device)
                # astype copies: the data's arrays are read-only, torch wants writable ones.
                y = torch.from_numpy(np.asarray(labels[lo : lo + batch_size]).astype(np.int64))
                y = y.to(device)
                logits = model(x)
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                preds.append(logits.argmax(1).cpu().numpy())
    finally:
        model.train(was_training)
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    conf = confusion_matrix(labels, pred, m)
    n = max(len(labels), 1)
    return float(np.trace(conf) / n), loss_sum / n, conf


# --------------------------------------------------------------------------- curated set


@dataclass(frozen=True, eq=False)
class CuratedSet:
    """The training split minus the samples that contain the pair's uncertain prototypes.

    ``keep`` is ``(N,)`` bool over the training split's rows; ``removed_by_class`` and
    ``removed_by_prototype`` count the removed samples (a sample that contains two of the
    prototypes counts once per prototype in the latter).
    """

    pair: tuple[str, str]
    prototypes: tuple[str, ...]
    rule: dict[str, Any]
    keep: np.ndarray = field(repr=False)
    removed_by_class: dict[str, int]
    removed_by_prototype: dict[str, int]
    class_sizes: dict[str, int]
    explanation_agreement: float | None = None

    @property
    def n_full(self) -> int:
        return int(self.keep.size)

    @property
    def n_curated(self) -> int:
        return int(self.keep.sum())

    @property
    def n_removed(self) -> int:
        return self.n_full - self.n_curated

    def describe(self) -> str:
        """One sentence: how many samples were removed, and why."""
        by_class = ", ".join(
            f"{n} of {self.class_sizes[c]} '{c}'" for c, n in self.removed_by_class.items() if n
        )
        only = (
            "samples of the two classes each prototype swings between"
            if self.rule["only_swing_classes"]
            else "samples of any class"
        )
        measure = (
            "hold at least {t:g} of the final Grad-CAM mass"
            if self.rule.get("active_rule") == "mass"
            else "reach at least {t:g} of the intensity of the sample's most looked-at "
            "prototype (final Grad-CAM)"
        ).format(t=self.rule["active_threshold"])
        return (
            f"curated set: removed {self.n_removed} of {self.n_full} training samples "
            f"({100 * self.n_removed / max(self.n_full, 1):.2f}%: {by_class or 'none'}) - "
            f"{only} in which uncertain prototype(s) {', '.join(self.prototypes)} {measure}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pair": list(self.pair),
            "prototypes": list(self.prototypes),
            "rule": self.rule,
            "n_full": self.n_full,
            "n_curated": self.n_curated,
            "n_removed": self.n_removed,
            "removed_by_class": self.removed_by_class,
            "removed_by_prototype": self.removed_by_prototype,
            "class_sizes": self.class_sizes,
            "explanation_agreement": self.explanation_agreement,
            "description": self.describe(),
        }


def curated_mask(
    labels: np.ndarray,
    activity: np.ndarray,
    uncertain: Sequence[tuple[int, int, int]],
    threshold: float,
    *,
    only_swing_classes: bool = True,
) -> tuple[np.ndarray, dict[int, int]]:
    """The curated-set rule on arrays: which samples to keep.

    Args:
        labels: ``(N,)`` classes of the training split.
        activity: ``(N, K)`` how strongly each prototype is looked at in each sample at
            the final checkpoint, by the explanation's rule
            (:func:`whylook.intensity.activity`).
        uncertain: ``(prototype, class_a, class_b)`` for each uncertain prototype used.
        threshold: the explanation's ``active_threshold``: ``activity >= threshold`` is
            "active", the same rule ``explain`` used.
        only_swing_classes: remove only samples of ``class_a``/``class_b`` (the default,
            docs/METHOD-NOTES.md, Step 7); otherwise samples of any class that contain the
            prototype.

    Returns:
        ``(keep (N,) bool, removed count per prototype)``.

    Example:
        >>> labels = np.array([0, 1, 2, 0])
        >>> act = np.array([[0.5, 0.5], [0.05, 0.95], [0.6, 0.4], [0.0, 1.0]])
        >>> keep, removed = curated_mask(labels, act, [(0, 0, 1)], 0.1)
        >>> keep.tolist(), removed
        ([False, True, True, True], {0: 1})
    """
    labels = np.asarray(labels)
    act = np.asarray(activity)
    if act.ndim != 2 or act.shape[0] != labels.shape[0]:
        raise WhylookError(f"activity must have shape ({labels.shape[0]}, K), not {act.shape}")
    remove = np.zeros(labels.shape[0], dtype=bool)
    removed: dict[int, int] = {}
    for p, a, b in uncertain:
        hit = act[:, p] >= threshold
        if only_swing_classes:
            hit &= (labels == a) | (labels == b)
        removed[int(p)] = int(hit.sum())
        remove |= hit
    return ~remove, removed


def active_rule(explanation: Any) -> tuple[str, float]:
    """The explanation's activity rule and threshold (``"mass"`` for explanations written
    before the rule was recorded).

    >>> from types import SimpleNamespace
    >>> active_rule(SimpleNamespace(data={"structure_settings": {"active_threshold": 0.3,
    ...                                                           "active_rule": "intensity"}}))
    ('intensity', 0.3)
    """
    settings = explanation.data.get("structure_settings") or {}
    if "active_threshold" not in settings:
        raise WhylookError(
            "the explanation does not record its activity rule (structure_settings); rerun "
            "`whylook explain`"
        )
    return str(settings.get("active_rule", "mass")), float(settings["active_threshold"])


def training_activity(
    folder: Any,
    explanation: Any,
    prototypes: Any,
    *,
    device: torch.device,
    batch_size: int = 256,
    progress: bool | None = None,
) -> np.ndarray:
    """``(N, K)`` float32: how strongly each prototype is looked at in every sample of the
    training split (not only the analysis set) at the final checkpoint, by the
    explanation's activity rule (:func:`whylook.intensity.activity`).

    Computed in shards with the final checkpoint, and each shard cached under
    ``RUN/finetune/cache`` keyed by the checkpoint, prototypes, rule, layer and data, so an
    interrupted run resumes and a changed input never reuses a stale shard.
    """
    from whylook.intensity import activity
    from whylook.saliency import GradCAM, precision_key

    data = folder.data()
    train = data.train
    n, k = len(train.labels), int(prototypes.k)
    layer = explanation.data["layer"]
    last = len(folder.checkpoints) - 1
    key = _digest(
        {
            "v": _CACHE_VERSION,
            "ckpt": file_digest(folder.path / folder.checkpoints[last].file),
            "protos": _digest({n: prototypes.to_arrays()[n].tolist() for n in ("mean", "centers")}),
            "layer": layer,
            "rule": active_rule(explanation)[0],
            "data": getattr(data, "digest", folder.config.get("data")),
            "shard": _SHARD,
            **precision_key(explanation.precision),
        }
    )[:20]
    cache = folder.path / "finetune" / "cache"
    out = np.zeros((n, k), dtype=np.float32)
    model = None
    shards = list(range(0, n, _SHARD))
    for s, lo in enumerate(
        progress_bar(
            shards, desc="curated set: final Grad-CAM", total=len(shards), progress=progress
        )
    ):
        hi = min(lo + _SHARD, n)
        path = cache / f"activity-s{s:04d}-{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                out[lo:hi] = z["activity"]
            continue
        if model is None:
            model = folder.load_model(last, device=str(device))
        cam = GradCAM(model, layer, precision=explanation.precision)
        parts = []
        for res in cam.batches(
            train.images[lo:hi], train.labels[lo:hi], batch_size=batch_size, return_features=True
        ):
            assign = prototypes.assign(res.features)
            parts.append(activity(res.saliency, assign, k, rule=active_rule(explanation)[0]))
        out[lo:hi] = np.concatenate(parts)
        save_npz(path, {"activity": out[lo:hi]})
    return out


def choose_pair(
    explanation: Any, confusion: np.ndarray, pair: str | Sequence[str] = "auto"
) -> tuple[tuple[int, int], list[dict[str, Any]], str]:
    """The class pair to fine-tune on, its uncertain prototypes, and why it was chosen.

    Args:
        explanation: the run's explanation.
        confusion: ``(M, M)`` test-set confusion at the final checkpoint (rows = true).
        pair: ``"auto"``, ``"a,b"`` or ``(a, b)`` with class *names*.

    Returns:
        ``((a, b) class indices, the uncertain prototypes of the pair, reason)``.
    """
    classes = [str(c) for c in explanation.data["classes"]]
    by_pair: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for u in explanation.data.get("uncertain_prototypes", []):
        a, b = sorted(classes.index(str(c)) for c in u["classes"])
        by_pair.setdefault((a, b), []).append(u)
    listed = "; ".join(
        f"{classes[a]},{classes[b]} ({', '.join(u['id'] for u in us)})"
        for (a, b), us in sorted(by_pair.items())
    )
    if isinstance(pair, str) and pair.strip().lower() == "auto":
        if not by_pair:
            swings = (explanation.data.get("structure_settings") or {}).get("min_swings", 2)
            # A model that learns within a few checkpoints changes side once: the looser
            # rule is the first thing to try, before training again.
            looser = (" or `--min-swings 1` (StructureSettings(min_swings=1): one change of "
                      "side counts)" if isinstance(swings, int) and swings > 1 else "")
            raise WhylookError(
                "the explanation found no uncertain prototypes, so the curated set would equal "
                "the full set; rerun `whylook explain` with a larger "
                f"{option('analysis-size')}{looser}, or train with more "
                f"{option('checkpoints')}, so that swings can be told from noise"
            )
        scored = sorted(
            by_pair.items(),
            key=lambda kv: (
                -confusion_count(confusion, *kv[0]),
                -len(kv[1]),
                -sum(u["swings"] for u in kv[1]),
                kv[0],
            ),
        )
        (a, b), protos = scored[0]
        reason = (
            f"auto: of the {len(by_pair)} class pair(s) with uncertain prototypes, "
            f"{classes[a]}↔{classes[b]} has the most test-set confusions at the final "
            f"checkpoint ({confusion_count(confusion, a, b)})"
        )
        return (a, b), protos, reason
    names = (
        [s.strip() for s in pair.split(",")] if isinstance(pair, str) else [str(s) for s in pair]
    )
    if len(names) != 2 or names[0] == names[1]:
        raise WhylookError(
            f"{option('pair')} must be two different class names 'a,b' or 'auto', not {pair!r}"
        )
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise WhylookError(
            f"class {unknown[0]!r} is not a class of this run; classes are {', '.join(classes)}"
        )
    a, b = sorted(classes.index(n) for n in names)
    if (a, b) not in by_pair:
        others = f"{listed}, or let whylook choose among them (pair 'auto')" if listed else "none"
        raise WhylookError(
            f"no uncertain prototype swings between {classes[a]} and {classes[b]}, so the "
            f"curated set would equal the full set; pairs with uncertain prototypes: {others}"
        )
    return (a, b), by_pair[(a, b)], f"user: --pair {classes[a]},{classes[b]}"


# --------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class StrategyResult:
    """One strategy's test measures, one entry per seed (in ``seeds`` order)."""

    stages: tuple[str, ...]
    seeds: tuple[int, ...]
    accuracy: tuple[float, ...]
    confusions: tuple[int, ...]
    loss: tuple[float, ...]

    @property
    def name(self) -> str:
        return ">".join(self.stages)

    @property
    def label(self) -> str:
        return _label(self.stages)

    def accuracy_mean_std(self) -> tuple[float, float | None]:
        return _mean_std(self.accuracy)

    def confusions_mean_std(self) -> tuple[float, float | None]:
        return _mean_std(self.confusions)


@dataclass(frozen=True, eq=False)
class FinetuneResult:
    """The result of :func:`finetune`; ``table()`` is what the CLI prints."""

    path: Path
    classes: tuple[str, ...]
    pair: tuple[str, str]
    pair_reason: str
    curated: CuratedSet
    start: dict[str, Any]
    strategies: tuple[StrategyResult, ...]
    settings: dict[str, Any]
    seconds: float

    def paired(self, name: str, baseline: str = "full>full") -> dict[str, Any] | None:
        """Per-seed differences ``name − baseline`` (same seeds): mean, std and a paired
        t-test p-value, for accuracy (percentage points) and confusions."""
        by = {s.name: s for s in self.strategies}
        if name == baseline or name not in by or baseline not in by:
            return None
        out: dict[str, Any] = {"baseline": baseline}
        for what, scale in (("accuracy", 100.0), ("confusions", 1.0)):
            d = scale * (
                np.asarray(getattr(by[name], what), float)
                - np.asarray(getattr(by[baseline], what), float)
            )
            mean, std = _mean_std(d)
            p = None
            if len(d) > 1 and np.ptp(d) > 0:
                p = float(stats.ttest_1samp(d, 0.0).pvalue)
            out[what] = {
                "mean": round(mean, 6),
                "std": None if std is None else round(std, 6),
                "p_value": None if p is None else round(p, 6),
            }
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per strategy (what ``finetune.json`` lists as ``strategies``)."""
        a, b = self.pair
        rows = []
        for s in self.strategies:
            acc, acc_sd = s.accuracy_mean_std()
            con, con_sd = s.confusions_mean_std()
            rows.append(
                {
                    "strategy": s.label,
                    "name": s.name,
                    "n_seeds": len(s.seeds),
                    "accuracy_mean": round(100 * acc, 4),
                    "accuracy_std": None if acc_sd is None else round(100 * acc_sd, 4),
                    "confusions_mean": round(con, 4),
                    "confusions_std": None if con_sd is None else round(con_sd, 4),
                    "pair": f"{a}↔{b}",
                }
            )
        return rows

    def _table_rows(self) -> list[tuple[str, str, str]]:
        def pm(mean: float, sd: float | None, digits: int) -> str:
            return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")

        out = [
            (
                "θ_T (no fine-tuning)",
                f"{100 * self.start['test_accuracy']:.2f}",
                str(self.start["confusions"]),
            )
        ]
        for r in self.rows():
            out.append(
                (
                    r["strategy"],
                    pm(r["accuracy_mean"], r["accuracy_std"], 2),
                    pm(r["confusions_mean"], r["confusions_std"], 2),
                )
            )
        return out

    def table(self) -> str:
        """The terminal table: test accuracy and pair confusions, mean ± std over seeds."""
        a, b = self.pair
        n = len(self.settings["seeds"])
        head = ("strategy", "test accuracy (%)", f"{a}↔{b} confusions")
        body = self._table_rows()
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(3)]
        line = "  ".join("-" * w for w in widths)
        fmt = [
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in [head, *body]
        ]
        lines = [
            f"whylook finetune: pair {a}↔{b} ({self.pair_reason})",
            self.curated.describe(),
            "",
            fmt[0],
            line,
            *fmt[1:],
            "",
            f"mean ± sample std (ddof=1) over {n} seed(s) {list(self.settings['seeds'])}; "
            f"one epoch per stage from checkpoint {self.start['index']} (step "
            f"{self.start['step']}), {self.settings['optimizer']} lr={self.settings['lr']:g}",
        ]
        paired = self.paired("curated>full")
        if paired and paired["confusions"]["std"] is not None:
            c = paired["confusions"]
            lines.append(
                f"curated→full − full→full, paired by seed: confusions {c['mean']:+.2f} ± "
                f"{c['std']:.2f}"
                + (f" (paired t-test p = {c['p_value']:.3g})" if c["p_value"] is not None else "")
            )
        lines.append(f"written to {self.path}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table in Markdown (``finetune.md``)."""
        a, b = self.pair
        lines = [
            f"# Perturbation fine-tuning: {a}↔{b}",
            "",
            f"Pair: {self.pair_reason}.",
            "",
            self.curated.describe() + ".",
            "",
            f"| strategy | test accuracy (%) | {a}↔{b} confusions |",
            "|---|---|---|",
            *(f"| {r[0]} | {r[1]} | {r[2]} |" for r in self._table_rows()),
            "",
            f"Mean ± sample standard deviation (ddof = 1) over seeds "
            f"{list(self.settings['seeds'])}; confusions = C[a,b] + C[b,a] on the test split. "
            f"Each strategy starts from checkpoint {self.start['index']} (step "
            f"{self.start['step']}) with a fresh {self.settings['optimizer']} optimizer "
            f"(lr {self.settings['lr']:g}, batch {self.settings['batch_size']}), one epoch per "
            "stage.",
            "",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "classes": list(self.classes),
            "pair": list(self.pair),
            "pair_reason": self.pair_reason,
            "curated": self.curated.to_json(),
            "start": self.start,
            "settings": self.settings,
            "strategies": self.rows(),
            "per_seed": [
                {
                    "strategy": s.label,
                    "seed": seed,
                    "accuracy": round(100 * acc, 4),
                    "confusions": con,
                    "loss": round(loss, 6),
                }
                for s in self.strategies
                for seed, acc, con, loss in zip(
                    s.seeds, s.accuracy, s.confusions, s.loss, strict=True
                )
            ],
            "paired_vs_full_full": {
                s.name: self.paired(s.name) for s in self.strategies if self.paired(s.name)
            },
            "seconds": round(self.seconds, 1),
            "versions": {"whylook": __version__, "torch": torch.__version__},
        }


def _optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise WhylookError(f"unknown optimizer {name!r}; use adam or sgd")


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    images: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> None:
    from whylook.data import to_tensor

    model.train()
    starts = list(range(0, len(order), batch_size))
    # A last batch of one sample would break BatchNorm in training mode; fold it in.
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    for i, lo in enumerate(starts):
        hi = starts[i + 1] if i + 1 < len(starts) else len(order)
        idx = order[lo:hi]
        x = to_tensor(np.asarray(images[idx])).to(device)
        y = torch.from_numpy(np.asarray(labels[idx], np.int64)).to(device)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _run_seed(
    folder: Any,
    strategies: Sequence[tuple[str, ...]],
    seed: int,
    keep: np.ndarray,
    *,
    optimizer: str,
    lr: float,
    batch_size: int,
    device: torch.device,
    test: Any,
    m: int,
) -> dict[tuple[str, ...], tuple[float, float, np.ndarray]]:
    """``(accuracy, loss, test confusion)`` of each strategy under one seed; shared stage
    prefixes are computed once."""
    train = folder.data().train
    n = len(train.labels)
    last = len(folder.checkpoints) - 1
    wanted = set(strategies)
    needed_prefixes = {s[:j] for s in strategies for j in range(1, len(s))}
    # prefix -> (model state, optimizer state); only prefixes another strategy continues.
    saved: dict[tuple[str, ...], tuple[dict, dict]] = {}
    results: dict[tuple[str, ...], tuple[float, float, np.ndarray]] = {}
    for stages in sorted(wanted, key=lambda s: (len(s), s)):
        start = max((p for p in saved if stages[: len(p)] == p), key=len, default=())
        model = folder.load_model(last, device=str(device))
        opt = _optimizer(model, optimizer, lr)
        if start:
            model.load_state_dict(saved[start][0])
            opt.load_state_dict(saved[start][1])
        for j in range(len(start), len(stages)):
            torch.manual_seed(_torch_seed(seed, j))
            order = stage_order(n, seed, j, None if stages[j] == "full" else keep)
            _train_epoch(model, opt, train.images, train.labels, order, batch_size, device)
            prefix = stages[: j + 1]
            if prefix in needed_prefixes and prefix not in saved:
                saved[prefix] = (
                    {k: v.detach().clone() for k, v in model.state_dict().items()},
                    _clone_state(opt.state_dict()),
                )
            if prefix in wanted and prefix not in results:
                results[prefix] = evaluate(model, test.images, test.labels, m, device=device)
                if not math.isfinite(results[prefix][1]):
                    raise WhylookError(
                        f"fine-tuning diverged (test loss is not finite after "
                        f"{'>'.join(prefix)}, seed {seed}); lower {option('lr')}"
                    )
    return results


def _clone_state(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_state(v) for v in obj]
    return obj


def finetune(
    run: str | Path | Any,
    *,
    pair: str | Sequence[str] = "auto",
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    seeds: int | Sequence[int] = 5,
    lr: float | None = None,
    optimizer: str | None = None,
    batch_size: int | None = None,
    scope: str = "pair",
    only_swing_classes: bool = True,
    device: str = "auto",
    progress: bool | None = None,
) -> FinetuneResult:
    """Perturbation fine-tuning (docs/METHOD-NOTES.md, Step 7) of a run, from its final
    checkpoint.

    Args:
        run: an explained run folder (path or :class:`whylook.run.RunFolder`).
        pair: ``"auto"`` or two class names ``"a,b"`` (see the module docstring).
        strategies: e.g. ``"curated>full"``; one epoch per stage.
        seeds: a number of seeds (``0..n-1``) or the seeds themselves.
        lr: fine-tuning learning rate (default: the run's training rate).
        optimizer: ``"adam"`` or ``"sgd"`` (default: the run's).
        batch_size: default the run's.
        scope: ``"pair"`` uses the uncertain prototypes of the chosen pair, ``"all"``
            every uncertain prototype (each removes samples of its own two classes).
        only_swing_classes: remove only samples of the classes a prototype swings
            between (the method's default) rather than of any class.

    Returns:
        The :class:`FinetuneResult`, also written to ``RUN/finetune/finetune.json`` and
        ``finetune.md``.

    Example:
        >>> res = finetune("runs/mnist", pair="auto", seeds=5)  # doctest: +SKIP
        >>> print(res.table())  # doctest: +SKIP
    """
    from whylook.explain import require_explained

    folder = _open(run)
    require_explained(folder)  # the one-line error before anything else; read under the lock
    if isinstance(strategies, str):  # one string: comma-separated, as on the command line
        strategies = strategies.split(",")
    parsed = [parse_strategy(s) for s in strategies]
    if not parsed or len(set(parsed)) != len(parsed):
        raise WhylookError("give at least one strategy, each once (e.g. full>full,curated>full)")
    seed_list = _seed_list(seeds)
    if scope not in {"pair", "all"}:
        raise WhylookError(f"scope must be 'pair' or 'all', not {scope!r}")
    # Settings are checked before the minutes of work that come before they are used.
    from whylook.train import check_lr

    check_lr(lr)
    if batch_size is not None and (not is_whole(batch_size) or batch_size < 1):
        raise WhylookError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
    if optimizer is not None and str(optimizer).lower() not in {"adam", "sgd"}:
        raise WhylookError(f"unknown optimizer {optimizer!r}; use adam or sgd")
    dev = resolve_device(device)
    # Fine-tuning trains: a caller's no_grad or inference_mode must not reach it.
    with run_lock(folder.path), torch.inference_mode(False), torch.enable_grad():
        # A killed finetune's temporary files.
        remove_temporaries(folder.path / "finetune")
        remove_temporaries(folder.path / "finetune" / "cache")
        # Read again under the lock: an explain that held it may have rewritten the file.
        return _finetune_locked(
            folder,
            require_explanation(folder),
            pair,
            parsed,
            seed_list,
            lr,
            optimizer,
            batch_size,
            scope,
            only_swing_classes,
            dev,
            progress,
        )


def _training_defaults(folder: Any, optimizer: str | None) -> tuple[str, float, int]:
    """The optimizer (``optimizer``, else the run's), its learning rate and the batch size,
    as train.py recorded them. An imported run records none: Adam, batch 128, and the rate
    of the optimizer used (train.py's default for Adam, 0.01 for SGD). A rate the run
    recorded is for its own optimizer; with another one, that one's default applies."""
    from whylook.train import DEFAULT_LR

    cfg = folder.config
    recorded = str(cfg.get("optimizer") or "adam").lower()
    name = (optimizer or recorded).lower()
    default = DEFAULT_LR if name == "adam" else 0.01
    lr = float(cfg.get("lr") or default) if name == recorded else default
    return name, lr, int(cfg.get("batch_size") or 128)


def _finetune_locked(
    folder: Any,
    exp: Any,
    pair: Any,
    parsed: list[tuple[str, ...]],
    seed_list: list[int],
    lr: float | None,
    optimizer: str | None,
    batch_size: int | None,
    scope: str,
    only_swing_classes: bool,
    dev: torch.device,
    progress: bool | None,
) -> FinetuneResult:
    t0 = time.perf_counter()
    classes = tuple(str(c) for c in exp.data["classes"])
    if tuple(str(c) for c in folder.classes) != classes:
        raise WhylookError(
            f"the explanation of {folder.path} is for other classes than the run; rerun "
            f"`whylook explain {folder.path}`"
        )
    m = len(classes)
    data = folder.data()
    last = len(folder.checkpoints) - 1
    ckpt = folder.checkpoints[last]
    final = folder.load_model(last, device=str(dev))
    acc0, loss0, conf0 = evaluate(final, data.test.images, data.test.labels, m, device=dev)
    (a, b), protos, reason = choose_pair(exp, conf0, pair)
    if scope == "all":
        protos = list(exp.data.get("uncertain_prototypes", []))

    rule, threshold = active_rule(exp)
    prototypes = load_prototypes(folder, exp, device=str(dev))
    act = training_activity(folder, exp, prototypes, device=dev, progress=progress)
    uncertain = []
    for u in protos:
        first, second = (classes.index(str(c)) for c in u["classes"][:2])
        uncertain.append((int(u["id"].split("-")[1]), first, second))
    keep, removed_by_proto = curated_mask(
        data.train.labels, act, uncertain, threshold, only_swing_classes=only_swing_classes
    )
    # The same rule on the analysis rows, read from the explanation's own `active` matrix
    # (True/False as 1/0, so a threshold of 1 keeps its verdicts): how far the whole-split
    # recomputation agrees with what `explain` stored.
    keep_rows, _ = curated_mask(
        exp.arrays["labels"],
        exp.arrays["active"].astype(np.float32),
        uncertain,
        1.0,
        only_swing_classes=only_swing_classes,
    )
    agreement = round(float((keep_rows == keep[exp.arrays["sample_index"]]).mean()), 6)
    labels = data.train.labels
    curated = CuratedSet(
        pair=(classes[a], classes[b]),
        prototypes=tuple(u["id"] for u in protos),
        rule={
            "contain": "active",
            "active_rule": rule,
            "active_threshold": threshold,
            "scope": scope,
            "only_swing_classes": bool(only_swing_classes),
            "uncertain": [
                {"id": u["id"], "classes": list(u["classes"]), "swings": u["swings"]}
                for u in protos
            ],
        },
        keep=keep,
        removed_by_class={c: int((~keep & (labels == i)).sum()) for i, c in enumerate(classes)},
        removed_by_prototype={f"P-{p}": n for p, n in removed_by_proto.items()},
        class_sizes={c: int((labels == i).sum()) for i, c in enumerate(classes)},
        explanation_agreement=agreement,
    )
    if curated.n_curated == 0:
        raise WhylookError(
            "the curated set is empty: every sample contains an uncertain "
            "prototype; use scope='pair' or a higher active threshold"
        )

    opt_name, run_lr, run_bs = _training_defaults(folder, optimizer)
    # The paper does not state its fine-tuning rate; by default each stage is one more epoch
    # of the run's own training (its optimizer kind, rate and batch size), on another set.
    lr = float(lr) if lr is not None else run_lr
    batch_size = int(batch_size or run_bs)
    settings = {
        "seeds": seed_list,
        "std": "sample standard deviation (ddof=1)",
        "optimizer": opt_name,
        "lr": lr,
        "batch_size": batch_size,
        "epochs_per_stage": 1,
        "strategies": [">".join(s) for s in parsed],
        "device": str(dev),
        "order": "stage j of seed s visits permutation rng([s, j]) of the training rows; "
        "curated stages skip the removed rows",
    }
    # One cache entry per (strategy, seed). It holds the whole test confusion matrix, and
    # its key names the curated set only for strategies that use it: a full-only strategy
    # is the same for every pair, so trying another pair reruns only the curated ones.
    common = {
        "v": _CACHE_VERSION,
        "ckpt": file_digest(folder.path / ckpt.file),
        **{k: v for k, v in settings.items() if k not in {"seeds", "strategies"}},
    }
    keep_digest = hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()
    cache = folder.path / "finetune" / "cache"

    def entry(stages: tuple[str, ...], seed: int) -> Path:
        used = keep_digest if "curated" in stages else None
        key = _digest({**common, "stages": stages, "keep": used, "seed": seed})[:20]
        return cache / f"{'-'.join(stages)}-seed{seed}-{key}.json"

    per_seed: dict[int, dict[tuple[str, ...], tuple[float, float, np.ndarray]]] = {}
    computed = 0
    for seed in progress_bar(
        seed_list, desc="fine-tuning: seeds", total=len(seed_list), progress=progress
    ):
        per_seed[seed] = {}
        for stages in parsed:
            if entry(stages, seed).is_file():
                got = read_json(entry(stages, seed), what="fine-tuning cache")
                per_seed[seed][stages] = (got["accuracy"], got["loss"], np.array(got["confusion"]))
        missing = [s for s in parsed if s not in per_seed[seed]]
        if not missing:
            continue
        # Each stage seeds torch's generator; the caller's own random state is put back.
        with rng_kept(dev):
            fresh = _run_seed(
                folder,
                missing,
                seed,
                keep,
                optimizer=opt_name,
                lr=lr,
                batch_size=batch_size,
                device=dev,
                test=data.test,
                m=m,
            )
        for stages, (acc, loss, conf) in fresh.items():
            write_json(
                entry(stages, seed),
                {"accuracy": acc, "loss": loss, "confusion": conf.tolist()},
            )
        per_seed[seed].update(fresh)
        computed += len(fresh)
    # Recorded after the cache key was made: it says how much this call computed.
    settings["computed_now"] = f"{computed} of {len(parsed) * len(seed_list)} strategy-seed results"

    results = tuple(
        StrategyResult(
            stages=s,
            seeds=tuple(seed_list),
            accuracy=tuple(float(per_seed[x][s][0]) for x in seed_list),
            confusions=tuple(confusion_count(per_seed[x][s][2], a, b) for x in seed_list),
            loss=tuple(float(per_seed[x][s][1]) for x in seed_list),
        )
        for s in parsed
    )
    out_dir = folder.path / "finetune"
    result = FinetuneResult(
        path=out_dir / "finetune.json",
        classes=classes,
        pair=(classes[a], classes[b]),
        pair_reason=reason,
        curated=curated,
        start={
            # The report tells fine-tuning of an earlier explanation by this.
            "explanation_sha256": file_digest(folder.path / "analysis" / "explanation.json"),
            "index": int(ckpt.index),
            "step": int(ckpt.step),
            "file": str(ckpt.file),
            "sha256": file_digest(folder.path / ckpt.file),
            "test_accuracy": round(acc0, 6),
            "test_loss": round(loss0, 6),
            "confusions": confusion_count(conf0, a, b),
        },
        strategies=results,
        settings=settings,
        seconds=time.perf_counter() - t0,
    )
    # finetune.md is finetune.json's table: the old one goes first, so a kill between the
    # two writes leaves no table of another run beside the new results.
    (out_dir / "finetune.md").unlink(missing_ok=True)
    write_json(result.path, result.to_json())
    write_bytes(out_dir / "finetune.md", result.markdown().encode())
    return result
