"""Step 6: assemble the structured explanation from the arrays of Steps 1-5.

The paper describes shared, specialized and uncertain prototypes and the learning order
informally. This module pins each one down as a rule over arrays, and every rule that
reads β separates signal from noise with the standard errors of Step 5 (jackknife by
default):

* **active** – prototype ``k`` is active in sample ``i`` when its *activity* (see
  :func:`whylook.intensity.activity`) is at least ``active_threshold``: by default its
  final intensity relative to the sample's most intense prototype (threshold 0.3), or, with
  ``active_rule="mass"``, its share of the final saliency mass (threshold 0.1). Presence
  alone is not enough: background prototypes are present in every image.
* **support** – the evidence that more attention to ``k`` raised the confidence in class
  ``c`` *while class c was being learned*: ``Σ_t w_t β^t[k, c] / Σ_t w_t`` with
  ``w_t`` the mean rise of class ``c``'s own confidence over its samples at transition
  ``t`` (falls count as 0), and a z-score from the per-step standard errors.
  A plain sum over all transitions mixes phases: early on, when the model cannot yet
  tell classes apart, β trades weight between co-occurring prototypes and its signs are
  unstable; the transitions in which a class is learned are the ones that say what the
  class was learned *from*. A class whose confidence never rises gets uniform weights.
* **shared** prototypes of ``c`` – active in at least ``shared_rate`` of class ``c`` and
  with support for ``c`` at least ``z_threshold`` standard errors above zero; ordered by
  ``active rate × support``. Support can be read from more than one fit (``explain``
  passes the global β and the class-conditional β): each prototype and class then takes
  the fit with the larger z, and the threshold rises so that the chance of passing by
  noise alone stays that of one fit at ``z_threshold`` (Bonferroni: 2.28 for two fits at
  2.0). The two fits miss real support in opposite ways: the global β credits a part that
  two classes share to one of them (a sample of the other class pays for attention to it
  with the confidence it loses), and a class-conditional fit has only that class's
  samples (docs/METHOD-NOTES.md, Step 6).
* **specialized** prototypes of ``c`` – for a sub-group of ``c`` (Step 4), active in at
  least ``shared_rate`` of the group and at least ``specialized_margin`` less often in the
  rest of ``c``, with a Fisher exact test below ``specialized_p``.
* **uncertain** prototypes – for a prototype active in both classes of a pair, the class
  it significantly favours changes at least ``min_swings`` times across the checkpoints.
  It favours ``a`` at checkpoint t when its support accumulated so far,
  ``Σ_{s<t} (β^s[k, a] − β^s[k, b])``, is at least ``z_threshold`` of its own standard
  errors above zero (and ``b`` when below): ``lead_se`` from Step 5, which counts how the
  two classes' coefficients co-vary, or else their errors in quadrature. Per-transition
  coefficients flip sign often as
  co-occurring prototypes trade weight; only a flip of the accumulated lead is a
  sustained change of which class the prototype serves.
* **learning order** – a pair (a, b) is separated at the first checkpoint from which its
  pairwise accuracy (the true class scores above the other class of the pair) stays at or
  above ``1 − separation_tolerance``. Pairwise accuracy rather than raw confusion counts,
  because an untrained model that predicts one class has zero confusion on every pair
  that does not involve it. Distinctness is the Jensen-Shannon distance between the two
  classes' mean prototype activity profiles (normalised to distributions); the Spearman
  correlation between the two is the paper's "more distinct pairs are separated first"
  as a measured number (negative when the finding holds).
* **learning unseen** (beyond the paper) – the share of class ``c``'s learning during
  which Grad-CAM showed nothing of its samples: ``Σ_t w_t u_t`` with the learning weights
  of *support* and ``u_t`` the fraction of class-c samples whose map is all zero at both
  checkpoints ``t`` and ``t+1``. Grad-CAM's ReLU zeroes a whole map when every position's
  evidence for the class is negative; such a sample's ``ΔP`` is 0, so β cannot say what
  the class was learned from at that step, and its support rests on its other
  transitions and on other classes' samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from whylook._checks import is_number, is_whole
from whylook._text import RATE_ROUNDING
from whylook.errors import WhylookError, option
from whylook.mapping import LeadErrors

__all__ = [
    "Candidate",
    "ClassExplanation",
    "LearningOrder",
    "NoShared",
    "PairConfusion",
    "PairSeparation",
    "SpecializedGroup",
    "Structure",
    "StructureSettings",
    "UncertainPrototype",
    "accumulated_lead",
    "assemble",
    "class_accuracy",
    "confusion_matrix",
    "pair_confusion",
    "prototype_id",
    "uncertain_rule",
]


# The summary and the report name a class whose learning unseen is at least this.
UNSEEN_NOTE = 0.25

#: The fewest separated class pairs the learning-order correlation is computed on; with
#: fewer, ``LearningOrder.spearman`` and ``p_value`` are ``None`` (not measurable), and the
#: summary and the report say so also for files written before the rule.
MIN_SEPARATED_PAIRS = 3


def prototype_id(k: int) -> str:
    """The paper's name of prototype ``k``: ``P-k``."""
    return f"P-{k}"


@dataclass(frozen=True)
class StructureSettings:
    """Thresholds of Step 6. Every value is recorded in ``explanation.json``."""

    active_rule: str = "intensity"
    active_threshold: float = -1.0  # < 0: the rule's default (0.3 intensity, 0.1 mass)
    shared_rate: float = 0.5
    z_threshold: float = 2.0
    specialized_margin: float = 0.25
    specialized_p: float = 0.01
    min_group_size: int = 5
    uncertain_min_rate: float = 0.1
    min_swings: int = 2
    separation_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.active_rule not in ("intensity", "mass"):
            raise WhylookError(
                f"active_rule must be 'intensity' or 'mass', not {self.active_rule!r}"
            )
        # Types first: a string would fail a comparison below with a TypeError, and NaN or
        # inf would pass some of the range checks and end up in explanation.json.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not (
                is_number(value) and math.isfinite(value)
            ):
                raise WhylookError(f"{f.name} must be a finite number, not {value!r}")
            if f.type == "int" and not is_whole(value):
                raise WhylookError(f"{f.name} must be a whole number, not {value!r}")
            if f.type in ("float", "int"):  # numpy scalars as Python's, for the JSON
                object.__setattr__(self, f.name, float(value) if f.type == "float" else int(value))
        if self.active_threshold < 0:
            default = 0.3 if self.active_rule == "intensity" else 0.1
            object.__setattr__(self, "active_threshold", default)
        for name in ("active_threshold", "shared_rate", "specialized_margin",
                     "uncertain_min_rate", "separation_tolerance"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise WhylookError(f"{name} must lie in [0, 1], not {value}")
        if self.z_threshold < 0:
            raise WhylookError(f"z_threshold must be non-negative, not {self.z_threshold}")
        if not 0.0 < self.specialized_p <= 1.0:
            raise WhylookError(f"specialized_p must lie in (0, 1], not {self.specialized_p}")
        if self.min_swings < 1 or self.min_group_size < 2:
            raise WhylookError("min_swings must be at least 1 and min_group_size at least 2")


@dataclass(frozen=True)
class SpecializedGroup:
    group: int
    size: int
    prototypes: tuple[str, ...]
    samples: tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    """A prototype named in a class's :class:`NoShared`, with the two numbers the rule
    reads and the other classes it is looked at in most samples of (a part shared with
    them is the usual reason attention to it does not raise this class's confidence)."""

    id: str
    active_rate: float
    support_z: float
    also_active_in: tuple[str, ...] = ()


@dataclass(frozen=True)
class NoShared:
    """Why a class has no shared prototype: the two halves of the rule, each alone.

    ``most_active``: the prototypes looked at in most of the class's samples (up to 3,
    most looked-at first), all with support below the threshold; when no prototype is
    looked at in most of them (``activity_met`` False), the 3 looked at most, whatever
    their support. ``best_supported``: of the prototypes whose support clears the
    threshold, the one looked at in most of the class's samples, yet in too few (``None``
    when no support clears the threshold).
    """

    most_active: tuple[Candidate, ...]
    best_supported: Candidate | None
    activity_met: bool = True


@dataclass(frozen=True)
class ClassExplanation:
    name: str
    n: int
    shared: tuple[str, ...]
    shared_strength: tuple[float, ...]
    specialized: tuple[SpecializedGroup, ...]
    why_no_shared: NoShared | None = None  # set only when ``shared`` is empty
    learning_unseen: float | None = None  # None: no saliency maps were given


@dataclass(frozen=True)
class UncertainPrototype:
    id: str
    classes: tuple[str, str]
    swings: int
    steps: tuple[int, ...]
    checkpoints: tuple[int, ...]
    favoured: tuple[str | None, ...]
    lead_z: tuple[float, ...] = ()


@dataclass(frozen=True)
class PairSeparation:
    pair: tuple[str, str]
    separated_at_step: int | None
    separated_at_checkpoint: int | None
    distinctness: float
    final_pairwise_accuracy: float


@dataclass(frozen=True)
class LearningOrder:
    pairs: tuple[PairSeparation, ...]
    spearman: float | None
    p_value: float | None
    n_pairs: int


def records_separation(entry: object) -> bool:
    """Whether one ``learning_order`` entry of an explanation.json records a separation (its
    ``separated_at_step`` is a finite number).

    The one test every reader of the file applies (the summary, the report, compare), so a
    file edited by hand or written by an older version reads the same in each.

    >>> records_separation({"pair": ["3", "8"], "separated_at_step": 120})
    True
    >>> [records_separation({"separated_at_step": s}) for s in (None, "7", True, float("nan"))]
    [False, False, False, False]
    """
    step = entry.get("separated_at_step") if isinstance(entry, dict) else None
    return is_number(step) and math.isfinite(step)


def order_correlation_of(data: dict[str, Any]) -> tuple[int, float | None, float | None]:
    """Separated pairs, Spearman ρ and its p-value of an explanation.json's learning order as
    the summary, the report and compare show them.

    ρ and p are ``None`` with fewer than ``MIN_SEPARATED_PAIRS`` separated pairs (files
    written before that rule may still hold a coefficient) and where the file holds no
    finite number.

    >>> order = [{"pair": ["a", "b"], "separated_at_step": 5}]
    >>> order_correlation_of({"learning_order": order,
    ...                       "learning_order_correlation": {"spearman": -1.0, "p_value": 0.0}})
    (1, None, None)
    """
    order = data.get("learning_order")
    separated = sum(map(records_separation, order)) if isinstance(order, list) else 0
    corr = data.get("learning_order_correlation")
    corr = corr if isinstance(corr, dict) else {}

    def finite(key: str) -> float | None:
        value = corr.get(key)
        return float(value) if is_number(value) and math.isfinite(value) else None

    if separated < MIN_SEPARATED_PAIRS:
        return separated, None, None
    rho = finite("spearman")
    return separated, rho, (finite("p_value") if rho is not None else None)


@dataclass(frozen=True)
class PairConfusion:
    """How often the model confused the class pairs that uncertain prototypes swing
    between, against the average pair: errors from one class of a pair to the other,
    both ways, over every checkpoint after initialisation. The paper reads an uncertain
    prototype as a cause of its pair's confusion, so the flagged pairs should stand out;
    a ``lift`` near 1 says the swings found are no better than picking pairs at random.
    """

    flagged_pairs: int
    flagged_mean: float | None  # confusions per flagged pair (None: no pair flagged)
    all_pairs_mean: float  # confusions per class pair
    lift: float | None  # flagged_mean / all_pairs_mean (None: either is missing or 0)


@dataclass(frozen=True)
class Structure:
    """The structured explanation (Step 6) plus the arrays it was read from."""

    settings: StructureSettings
    active: np.ndarray = field(repr=False)  # (n, K) bool
    active_rate_by_class: np.ndarray = field(repr=False)  # (K, M)
    support: np.ndarray = field(repr=False)  # (K, M) learning-weighted beta
    support_z: np.ndarray = field(repr=False)  # (K, M), of the fit with the larger z
    support_z_by_fit: np.ndarray = field(repr=False)  # (fits, K, M)
    support_threshold: float
    zero_saliency_rate: np.ndarray | None = field(repr=False)  # (T+1, M) or None
    classes: tuple[ClassExplanation, ...]
    uncertain: tuple[UncertainPrototype, ...]
    learning_order: LearningOrder
    uncertain_confusion: PairConfusion | None = None

    def to_json(self) -> dict[str, Any]:
        """The Step-6 part of ``explanation.json``."""
        return {
            "classes_explained": [
                {
                    "class": c.name,
                    "n": c.n,
                    "shared": list(c.shared),
                    "shared_strength": [round(s, 6) for s in c.shared_strength],
                    "specialized": [
                        {"group": g.group, "size": g.size, "prototypes": list(g.prototypes),
                         "samples": list(g.samples)}
                        for g in c.specialized
                    ],
                    "why_no_shared": _no_shared_json(c.why_no_shared),
                    "learning_unseen": _round_or_none(c.learning_unseen),
                }
                for c in self.classes
            ],
            "uncertain_prototypes": [
                {"id": u.id, "classes": list(u.classes), "swings": u.swings,
                 "steps": list(u.steps), "checkpoints": list(u.checkpoints),
                 "favoured": list(u.favoured), "lead_z": [round(z, 4) for z in u.lead_z]}
                for u in self.uncertain
            ],
            "learning_order": [
                {"pair": list(p.pair), "separated_at_step": p.separated_at_step,
                 "separated_at_checkpoint": p.separated_at_checkpoint,
                 "distinctness": round(p.distinctness, 6),
                 "final_pairwise_accuracy": round(p.final_pairwise_accuracy, 6)}
                for p in self.learning_order.pairs
            ],
            "uncertain_pairs_confusion": None if self.uncertain_confusion is None else {
                "flagged_pairs": self.uncertain_confusion.flagged_pairs,
                "flagged_mean": _round_or_none(self.uncertain_confusion.flagged_mean),
                "all_pairs_mean": _round_or_none(self.uncertain_confusion.all_pairs_mean),
                "lift": _round_or_none(self.uncertain_confusion.lift),
            },
            "learning_order_correlation": {
                "spearman": _round_or_none(self.learning_order.spearman),
                "p_value": _round_or_none(self.learning_order.p_value),
                "n_pairs": self.learning_order.n_pairs,
            },
            "structure_settings": asdict(self.settings),
        }


def _no_shared_json(why: NoShared | None) -> dict[str, Any] | None:
    if why is None:
        return None

    def one(c: Candidate) -> dict[str, Any]:
        return {"id": c.id, "active_rate": round(c.active_rate, 6),
                "support_z": round(c.support_z, 6), "also_active_in": list(c.also_active_in)}

    return {"most_active": [one(c) for c in why.most_active],
            "activity_met": why.activity_met,
            "best_supported": None if why.best_supported is None else one(why.best_supported)}


def _round_or_none(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _check_shapes(labels, activity, confidence, beta, beta_se, class_groups, steps, m):
    n, k = activity.shape
    if labels.shape != (n,):
        raise WhylookError(f"labels must have shape ({n},), not {labels.shape}")
    if confidence.ndim != 3 or confidence.shape[1:] != (n, m):
        raise WhylookError(f"confidence must have shape (T+1, {n}, {m}), not {confidence.shape}")
    t1 = confidence.shape[0]
    if beta.shape != (t1 - 1, k, m) or beta_se.shape != beta.shape:
        raise WhylookError(
            f"beta and beta_se must have shape ({t1 - 1}, {k}, {m}), not {beta.shape} and "
            f"{beta_se.shape}"
        )
    if class_groups.shape != (n,):
        raise WhylookError(f"class_groups must have shape ({n},), not {class_groups.shape}")
    if len(steps) != t1:
        raise WhylookError(f"{len(steps)} checkpoint steps given for {t1} checkpoints")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= m:
        raise WhylookError(f"labels must lie in [0, {m - 1}]")


def assemble(
    *,
    classes: tuple[str, ...] | list[str],
    steps: list[int] | tuple[int, ...],
    labels: np.ndarray,
    activity: np.ndarray,
    confidence: np.ndarray,
    beta: np.ndarray,
    beta_se: np.ndarray,
    class_groups: np.ndarray,
    settings: StructureSettings | None = None,
    support_fits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    zero_maps: np.ndarray | None = None,
    lead_se: np.ndarray | LeadErrors | None = None,
) -> Structure:
    """Assemble the structured explanation.

    Args:
        classes: the M class names.
        steps: the optimizer step of each of the T+1 checkpoints.
        labels: (n,) true classes of the analysis set.
        activity: (n, K) how strongly each prototype is looked at in each sample at the
            final checkpoint (:func:`whylook.intensity.activity` under
            ``settings.active_rule``).
        confidence: (T+1, n, M) softmax confidences at each checkpoint.
        beta, beta_se: (T, K, M) ridge coefficients and their standard errors.
        class_groups: (n,) the per-class sub-group of each sample (-1 is noise).
        support_fits: the fits "support for class c" is read from, each a pair
            ``(beta, se)`` of shape (T, K, M), e.g. the class-conditional fits of
            :func:`whylook.mapping.fit_class_mapping`; default: ``[(beta, beta_se)]``.
            With several, each prototype and class takes the fit with the larger z, and
            the threshold is Bonferroni-corrected for their number (module notes).
        zero_maps: (T+1, n) bool, True where a sample's Grad-CAM map is all zero at a
            checkpoint; gives each class its *learning unseen* (module notes).
        lead_se: the standard errors of the accumulated leads, which count the
            correlation of a prototype's coefficients for two classes:
            :attr:`whylook.mapping.Mapping.lead_errors`, which computes those of the
            pairs tested, or all of them, ``(T, K, M, M)``; default: ``beta_se`` added in
            quadrature, as if they were independent.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> n, K, M, T = 40, 4, 2, 3
        >>> s = assemble(classes=["a", "b"], steps=[0, 1, 2, 3],
        ...              labels=np.repeat([0, 1], 20), activity=rng.dirichlet(np.ones(K), n),
        ...              confidence=rng.dirichlet(np.ones(M), (T + 1, n)),
        ...              beta=rng.normal(size=(T, K, M)), beta_se=np.ones((T, K, M)),
        ...              class_groups=-np.ones(n, dtype=np.int16))
        >>> [c.name for c in s.classes]
        ['a', 'b']
    """
    settings = settings or StructureSettings()
    classes = tuple(str(c) for c in classes)
    m = len(classes)
    labels = np.asarray(labels, dtype=np.int64)
    activity = np.asarray(activity, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    beta_se = np.asarray(beta_se, dtype=np.float64)
    class_groups = np.asarray(class_groups, dtype=np.int64)
    _check_shapes(labels, activity, confidence, beta, beta_se, class_groups, steps, m)
    steps = [int(s) for s in steps]

    active = activity >= settings.active_threshold
    counts = np.bincount(labels, minlength=m)
    if (counts == 0).any():
        empty = [classes[c] for c in np.flatnonzero(counts == 0)]
        raise WhylookError(
            f"class(es) {', '.join(empty)} have no samples in the analysis set; raise "
            f"{option('analysis-size')} or check the labels"
        )
    onehot = np.eye(m)[labels]  # (n, M)
    active_rate = (active.T.astype(np.float64) @ onehot) / counts  # (K, M)

    # Standard errors of a sum of per-step estimates, taken as independent across steps.
    se = np.where(beta_se > 0, beta_se, np.inf)
    fits = [(beta, beta_se)] if support_fits is None else list(support_fits)
    if not fits:
        raise WhylookError("support_fits needs at least one (beta, se) pair")
    weights = learning_weights(confidence, labels, m)  # (T, M), columns sum to 1
    readings = [_support(weights, f_beta, f_se, beta.shape) for f_beta, f_se in fits]
    # Per prototype and class, the reading with the larger z.
    pick = np.argmax(np.stack([z for _, z in readings]), axis=0)
    support = np.choose(pick, [s for s, _ in readings])
    support_z = np.choose(pick, [z for _, z in readings])
    threshold = support_threshold(settings.z_threshold, len(fits))
    zero_rate: np.ndarray | None = None
    unseen: np.ndarray | None = None
    if zero_maps is not None:
        zero_rate, both = blank_rates(zero_maps, labels, m)
        if zero_rate.shape[0] != confidence.shape[0]:
            raise WhylookError(f"zero_maps must have one row per checkpoint "
                               f"({confidence.shape[0]}), not {zero_rate.shape[0]}")
        unseen = (weights * both).sum(axis=0)

    class_expl = []
    for c, name in enumerate(classes):
        in_c = labels == c
        shared = np.flatnonzero(
            (active_rate[:, c] >= settings.shared_rate) & (support_z[:, c] >= threshold)
        )
        strength = active_rate[shared, c] * np.maximum(support[shared, c], 0.0)
        order = np.argsort(-strength, kind="stable")
        top = strength[order[0]] if len(order) and strength[order[0]] > 0 else 1.0
        class_expl.append(
            ClassExplanation(
                name=name,
                n=int(in_c.sum()),
                shared=tuple(prototype_id(int(p)) for p in shared[order]),
                shared_strength=tuple(float(s / top) for s in strength[order]),
                specialized=_specialized(active, in_c, class_groups, settings),
                why_no_shared=None if len(shared) else _why_no_shared(
                    active_rate, support_z[:, c], c, classes, settings.shared_rate, threshold),
                learning_unseen=None if unseen is None else float(unseen[c]),
            )
        )

    if isinstance(lead_se, LeadErrors):
        if lead_se.shape[1:] != beta.shape[1:] or len(lead_se.parts) != beta.shape[0]:
            raise WhylookError(
                f"lead_se holds {len(lead_se.parts)} transitions of (K, M) = "
                f"{lead_se.shape[1:]}, beta is {beta.shape}"
            )
    elif lead_se is not None:
        lead_se = np.asarray(lead_se, dtype=np.float64)
        if lead_se.shape != (*beta.shape, m):
            raise WhylookError(
                f"lead_se must have shape {(*beta.shape, m)}, got {lead_se.shape}"
            )
    uncertain = _uncertain(beta, se, active_rate, classes, steps, settings, lead_se)
    learning = _learning_order(labels, confidence, activity, classes, steps, settings)
    return Structure(
        settings=settings,
        active=active,
        active_rate_by_class=active_rate.astype(np.float32),
        support=support.astype(np.float32),
        support_z=support_z.astype(np.float32),
        support_z_by_fit=np.stack([z for _, z in readings]).astype(np.float32),
        support_threshold=threshold,
        zero_saliency_rate=None if zero_rate is None else zero_rate.astype(np.float32),
        classes=tuple(class_expl),
        uncertain=uncertain,
        learning_order=learning,
        uncertain_confusion=pair_confusion(confidence, labels, classes, uncertain),
    )


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, m: int) -> np.ndarray:
    """``(M, M)`` int64 counts, rows = true class, columns = predicted class.

    >>> confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    out = np.zeros((m, m), dtype=np.int64)
    np.add.at(out, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return out


def pair_confusion(
    confidence: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    uncertain: Sequence[UncertainPrototype],
) -> PairConfusion:
    """:class:`PairConfusion` of the pairs in ``uncertain``, from the argmax of the
    confidences ``(T+1, n, M)`` at every checkpoint after the first.

    >>> conf = np.array([[[.9, .1, 0], [.1, .9, 0], [0, .1, .9]],
    ...                  [[.2, .8, 0], [.6, .4, 0], [0, .1, .9]]])
    >>> u = UncertainPrototype("P-0", ("a", "b"), 2, (1, 2), (1, 2), ("a", "b"), (2.0, -2.0))
    >>> c = pair_confusion(conf, np.array([0, 1, 2]), ["a", "b", "c"], [u])
    >>> c.flagged_pairs, c.flagged_mean, round(c.all_pairs_mean, 3), c.lift
    (1, 2.0, 0.667, 3.0)
    """
    m = len(classes)
    predicted = np.asarray(confidence)[1:].argmax(axis=2)  # (T, n), checkpoint-major
    counts = confusion_matrix(np.tile(labels, predicted.shape[0]), predicted.ravel(), m)
    both_ways = counts + counts.T
    upper = np.triu_indices(m, 1)
    all_mean = float(both_ways[upper].mean()) if m > 1 else 0.0
    index = {name: i for i, name in enumerate(classes)}
    flagged = {tuple(sorted(index[c] for c in u.classes)) for u in uncertain}
    flagged_mean = float(np.mean([both_ways[a, b] for a, b in flagged])) if flagged else None
    lift = flagged_mean / all_mean if flagged_mean is not None and all_mean > 0 else None
    return PairConfusion(flagged_pairs=len(flagged), flagged_mean=flagged_mean,
                         all_pairs_mean=all_mean, lift=lift)


def blank_maps(saliency: np.ndarray) -> np.ndarray:
    """``(T+1, n)`` bool: where a sample's Grad-CAM map ``(T+1, n, h, w)`` is all zero."""
    sal = np.asarray(saliency)
    return np.logical_not(sal.reshape(sal.shape[0], sal.shape[1], -1).any(axis=2))


def blank_rates(
    zero_maps: np.ndarray, labels: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the fraction of its samples whose map is all zero at each checkpoint
    ``(T+1, M)``, and at both ends of each transition ``(T, M)`` (0 for an empty class).

    >>> zero = np.array([[True, False], [True, True]])
    >>> [r.tolist() for r in blank_rates(zero, np.array([0, 0]), 1)]
    [[[0.5], [1.0]], [[0.5]]]
    """
    zero = np.asarray(zero_maps)
    labels = np.asarray(labels)
    if zero.ndim != 2 or zero.shape[1] != labels.shape[0] or zero.dtype != np.bool_:
        raise WhylookError(f"zero_maps must be a bool array of shape (T+1, {labels.shape[0]}), "
                           f"not {zero.dtype} {zero.shape}")
    onehot = np.eye(m)[labels]  # (n, M)
    counts = onehot.sum(axis=0)

    def rate(x: np.ndarray) -> np.ndarray:
        return np.divide(x.astype(np.float64) @ onehot, counts,
                         out=np.zeros((x.shape[0], m)), where=counts > 0)

    return rate(zero), rate(zero[1:] & zero[:-1])


def _why_no_shared(
    rates: np.ndarray,
    z: np.ndarray,
    c: int,
    classes: tuple[str, ...],
    shared_rate: float,
    threshold: float,
) -> NoShared:
    """The candidates each condition of "shared" admits, for a class that has none.

    A class without shared prototypes is a finding, not a gap: most often the part most
    of its samples are looked at through does not raise its confidence (a part it shares
    with other classes), while the part that does is looked at in a minority of them.
    """
    rate = rates[:, c]
    looked_at = np.flatnonzero(rate >= shared_rate)
    # Where nothing reaches the activity bar, the closest prototypes stand in for it.
    pool = looked_at if looked_at.size else np.arange(rate.size)
    top = pool[np.argsort(-rate[pool], kind="stable")][:3]
    supported = np.flatnonzero(z >= threshold)
    # Of the supported ones, the one nearest to the activity bar: the clearest z alone
    # often belongs to a prototype the class is never looked at through.
    best = supported[np.lexsort((-z[supported], -rate[supported]))[0]] if supported.size else None

    def cand(k: int) -> Candidate:
        also = tuple(classes[o] for o in np.flatnonzero(rates[k] >= shared_rate) if o != c)
        return Candidate(prototype_id(int(k)), float(rate[k]), float(z[k]), also)

    return NoShared(tuple(cand(k) for k in top), None if best is None else cand(best),
                    activity_met=bool(looked_at.size))


def support_threshold(z_threshold: float, n_fits: int) -> float:
    """The z a reading must reach when support is the best of ``n_fits`` readings.

    One-sided Bonferroni: the chance that any of them passes by noise alone stays at
    most that of a single reading at ``z_threshold``.

    >>> round(support_threshold(2.0, 1), 3), round(support_threshold(2.0, 2), 3)
    (2.0, 2.278)
    """
    if n_fits <= 1:
        return float(z_threshold)
    from scipy import stats  # here: the report reads this module and needs no scipy.stats

    return float(stats.norm.isf(stats.norm.sf(z_threshold) / n_fits))


def _support(
    weights: np.ndarray, beta: np.ndarray, se: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Learning-weighted support ``(K, M)`` of one fit and its z-score."""
    beta = np.asarray(beta, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    if beta.shape != shape or se.shape != shape:
        raise WhylookError(f"every support fit must have shape {shape}, got {beta.shape}")
    support = np.einsum("tm,tkm->km", weights, np.nan_to_num(beta))
    se = np.where(np.isfinite(se) & (se > 0), se, 0.0)
    support_se = np.sqrt(np.einsum("tm,tkm->km", weights**2, se**2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(support_se > 0, support / support_se, 0.0)
    return support, z


def learning_weights(confidence: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Per class, how much of its learning happened at each transition: ``(T, M)``.

    ``w[t, c]`` is the mean rise of class ``c``'s confidence over its own samples from
    checkpoint ``t`` to ``t+1`` (falls count as 0), normalised to sum to 1 over ``t``.
    """
    t1 = confidence.shape[0]
    own = np.stack([confidence[:, labels == c, c].mean(axis=1) for c in range(m)], axis=1)
    rise = np.clip(np.diff(own, axis=0), 0.0, None)
    total = rise.sum(axis=0)
    uniform = np.full_like(rise, 1.0 / max(t1 - 1, 1))
    return np.where(total > 0, rise / np.where(total > 0, total, 1.0), uniform)


def _specialized(
    active: np.ndarray, in_c: np.ndarray, class_groups: np.ndarray, settings: StructureSettings
) -> tuple[SpecializedGroup, ...]:
    from scipy import stats  # see support_threshold

    rows_c = np.flatnonzero(in_c)
    groups_c = class_groups[rows_c]
    out = []
    for g in sorted(set(groups_c.tolist()) - {-1}):
        member = groups_c == g
        size, rest = int(member.sum()), int((~member).sum())
        if size < settings.min_group_size or rest == 0:
            continue
        a_in = active[rows_c[member]].sum(axis=0)
        a_out = active[rows_c[~member]].sum(axis=0)
        rate_in, rate_out = a_in / size, a_out / rest
        candidates = np.flatnonzero(
            (rate_in >= settings.shared_rate)
            & (rate_in - rate_out >= settings.specialized_margin - RATE_ROUNDING)
        )
        chosen = []
        for p in candidates:
            table = [[int(a_in[p]), size - int(a_in[p])], [int(a_out[p]), rest - int(a_out[p])]]
            if stats.fisher_exact(table, alternative="greater").pvalue < settings.specialized_p:
                chosen.append(int(p))
        chosen.sort(key=lambda p: -(rate_in[p] - rate_out[p]))
        if chosen:
            out.append(
                SpecializedGroup(
                    group=int(g),
                    size=size,
                    prototypes=tuple(prototype_id(p) for p in chosen),
                    samples=tuple(int(r) for r in rows_c[member][:8]),
                )
            )
    return tuple(out)


def accumulated_lead(
    beta: np.ndarray,
    se: np.ndarray | None,
    p: int,
    a: int,
    b: int,
    lead_se: np.ndarray | LeadErrors | None = None,
) -> np.ndarray:
    """``(T,)``: after each transition, how far prototype ``p``'s support accumulated so
    far favours class ``a`` over ``b``, in standard errors.

    ``Σ_{s<=t} (β^s[p, a] − β^s[p, b])`` over its standard error ``lead_se[t, p, a, b]``
    (:attr:`whylook.mapping.Mapping.lead_se`, or the same from
    :attr:`~whylook.mapping.Mapping.lead_errors`), or, without it, over
    ``sqrt(Σ_{s<=t} se^s[p, a]² + se^s[p, b]²)`` (0 where the error is 0). At or above
    ``z_threshold`` the prototype favours ``a``, at or below its negative ``b``;
    :func:`assemble` counts the changes of side as swings.

    >>> import numpy as np
    >>> beta = np.zeros((3, 1, 2)); beta[:, 0, 0] = [1.0, 1.0, -4.0]
    >>> accumulated_lead(beta, np.full((3, 1, 2), 0.5), 0, 0, 1).round(2).tolist()
    [1.41, 2.0, -1.63]
    >>> accumulated_lead(beta, None, 0, 0, 1, lead_se=np.ones((3, 1, 2, 2))).tolist()
    [1.0, 2.0, -2.0]
    """
    return _leads(beta, se, p, np.array([a]), np.array([b]), lead_se)[:, 0]


def _leads(
    beta: np.ndarray,
    se: np.ndarray | None,
    p: int,
    a: np.ndarray,
    b: np.ndarray,
    lead_se: np.ndarray | LeadErrors | None,
) -> np.ndarray:
    """``(T, A)``: :func:`accumulated_lead` of prototype ``p`` for the pairs ``(a[j], b[j])``."""
    lead = np.cumsum(beta[:, p, a] - beta[:, p, b], axis=0)
    if isinstance(lead_se, LeadErrors):
        error = lead_se.pairs(p, a, b)
    elif lead_se is not None:
        error = lead_se[:, p, a, b]
    elif se is not None:
        error = np.sqrt(np.cumsum(se[:, p, a] ** 2 + se[:, p, b] ** 2, axis=0))
    else:
        raise WhylookError("accumulated_lead needs se or lead_se")
    with np.errstate(invalid="ignore", divide="ignore"):
        z = lead / error
    return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


def _sides(z: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For leads ``z (T, A)``: the side each pair's prototype takes after each transition
    (+1 its first class, -1 its second, 0 undecided) and where that side differs from the
    last decided one before it (a swing).

    >>> sides, swings = _sides(np.array([[3.0], [0.5], [-2.5], [-3.0], [2.0]]), 2.0)
    >>> sides[:, 0].tolist(), np.flatnonzero(swings[:, 0]).tolist()
    ([1, 0, -1, -1, 1], [2, 4])
    """
    sides = np.where(z >= threshold, 1, np.where(z <= -threshold, -1, 0))
    at = np.arange(z.shape[0])[:, None]
    last = np.maximum.accumulate(np.where(sides != 0, at, -1), axis=0)
    before = np.vstack([np.full((1, z.shape[1]), -1), last[:-1]])
    side_before = np.take_along_axis(sides, np.maximum(before, 0), axis=0)
    return sides, (sides != 0) & (before >= 0) & (sides != side_before)


def uncertain_rule(
    beta: np.ndarray,
    beta_se: np.ndarray,
    active_rate: np.ndarray,
    classes: Sequence[str],
    steps: Sequence[int],
    settings: StructureSettings | None = None,
    lead_se: np.ndarray | LeadErrors | None = None,
) -> tuple[UncertainPrototype, ...]:
    """The uncertain-prototype rule alone, as :func:`assemble` applies it, on the given
    coefficients ``(T, K, M)`` and active rates ``(K, M)`` (see the module notes): for
    rerunning it on other fits of the same run, e.g. under a null.

    >>> beta = np.zeros((3, 1, 2)); beta[:, 0, 0] = [4.0, -10.0, 14.0]
    >>> [u.swings for u in uncertain_rule(beta, np.ones_like(beta), np.ones((1, 2)),
    ...                                   ["a", "b"], [0, 1, 2, 3])]
    [2]
    """
    beta = np.asarray(beta, dtype=np.float64)
    k, m = beta.shape[1:]
    if np.shape(beta_se) != beta.shape or np.shape(active_rate) != (k, m):
        raise WhylookError(
            f"beta_se must have beta's shape {beta.shape} and active_rate ({k}, {m}), not "
            f"{np.shape(beta_se)} and {np.shape(active_rate)}"
        )
    return _uncertain(beta, np.asarray(beta_se, dtype=np.float64), np.asarray(active_rate),
                      tuple(classes), list(steps), settings or StructureSettings(), lead_se)


def _uncertain(
    beta: np.ndarray,
    se: np.ndarray,
    active_rate: np.ndarray,
    classes: tuple[str, ...],
    steps: list[int],
    settings: StructureSettings,
    lead_se: np.ndarray | LeadErrors | None,
) -> tuple[UncertainPrototype, ...]:
    k = beta.shape[1]
    found = []
    for p in range(k):
        used = np.flatnonzero(active_rate[p] >= settings.uncertain_min_rate)
        if used.size < 2:
            continue
        # Every pair of those classes at once, in combinations() order.
        first, second = np.triu_indices(used.size, 1)
        a, b = used[first], used[second]
        # The lead of a over b in the support accumulated up to each checkpoint, in units
        # of its standard error. Per-transition coefficients flip sign all the time as
        # co-occurring prototypes trade weight; a flip of the accumulated lead is a
        # sustained change of which class the prototype serves.
        z = _leads(beta, se, p, a, b, lead_se)
        sides, swings = _sides(z, settings.z_threshold)
        for j in np.flatnonzero(swings.sum(axis=0) >= settings.min_swings):
            switches = np.flatnonzero(swings[:, j]).tolist()
            pair = (classes[a[j]], classes[b[j]])
            found.append(
                UncertainPrototype(
                    id=prototype_id(p),
                    classes=pair,
                    swings=len(switches),
                    # Transition t ends at checkpoint t+1: that is where the swing shows.
                    steps=tuple(steps[s + 1] for s in switches),
                    checkpoints=tuple(s + 1 for s in switches),
                    favoured=tuple(pair[0] if v > 0 else pair[1] if v < 0 else None
                                   for v in sides[:, j]),
                    lead_z=tuple(float(v) for v in z[:, j]),
                )
            )
    found.sort(key=lambda u: (-u.swings, int(u.id[2:]), u.classes))
    return tuple(found)


def pairwise_accuracy(confidence: np.ndarray, labels: np.ndarray, a: int, b: int) -> np.ndarray:
    """Per checkpoint, the fraction of samples of classes a and b whose true class scores
    above the other class of the pair. ``confidence`` is (T+1, n, M); returns (T+1,)."""
    rows = np.flatnonzero((labels == a) | (labels == b))
    true = labels[rows]
    other = np.where(true == a, b, a)
    conf = confidence[:, rows]
    idx = np.arange(len(rows))
    return (conf[:, idx, true] > conf[:, idx, other]).mean(axis=1)


def class_accuracy(confidence: np.ndarray, labels: np.ndarray, m: int) -> list[float | None]:
    """Per class: the share of its samples whose highest confidence is their class, from
    one checkpoint's ``(n, M)`` confidences (None for a class without samples).

    >>> class_accuracy(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), np.array([0, 1, 1]), 3)
    [1.0, 0.5, None]
    """
    counts = confusion_matrix(labels, np.asarray(confidence).argmax(axis=1), m)
    return [float(h / n) if n else None
            for h, n in zip(np.diagonal(counts), counts.sum(axis=1), strict=True)]


def _pairwise_accuracies(confidence: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """``(T+1, M, M)``: :func:`pairwise_accuracy` of every pair at once (symmetric; the
    diagonal is meaningless), from how often each class's samples rank it above each
    other class."""
    wins = np.zeros((confidence.shape[0], m, m))
    for c in range(m):
        conf = confidence[:, labels == c]
        wins[:, c] = (conf[:, :, c : c + 1] > conf).sum(axis=1)
    counts = np.bincount(labels, minlength=m).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (wins + wins.transpose(0, 2, 1)) / (counts[:, None] + counts[None, :])


def _learning_order(
    labels: np.ndarray,
    confidence: np.ndarray,
    activity: np.ndarray,
    classes: tuple[str, ...],
    steps: list[int],
    settings: StructureSettings,
) -> LearningOrder:
    from scipy import stats  # see support_threshold
    from scipy.spatial.distance import jensenshannon

    m = len(classes)
    profiles = np.stack([activity[labels == c].mean(axis=0) for c in range(m)])
    level = 1.0 - settings.separation_tolerance
    acc = _pairwise_accuracies(confidence, labels, m)
    checkpoints = np.arange(acc.shape[0])[:, None, None]
    # The last checkpoint at which each pair is still below the level (-1: never).
    last_below = np.where(acc < level - RATE_ROUNDING, checkpoints, -1).max(axis=0)
    has_mass = profiles.sum(axis=1) > 0
    # Every pair a < b at once, in the order of the loops over a, then b > a: the rank
    # correlation below is computed in that order. (A loop over the pairs took 4 s for a
    # 1000-class model's 499,500.)
    first, second = np.triu_indices(m, k=1)
    below = last_below[first, second]
    never = below == acc.shape[0] - 1
    at = np.where(below < 0, 0, below + 1)
    distinct = np.zeros(first.size)
    start = 0
    for a in range(m - 1):
        # One call per class against all later ones. A class the model never looks at
        # has no profile to compare (0 below, as before).
        with np.errstate(invalid="ignore", divide="ignore"):
            distinct[start:start + m - 1 - a] = jensenshannon(
                profiles[a], profiles[a + 1:], base=2, axis=-1)
        start += m - 1 - a
    distinct = np.where(has_mass[first] & has_mass[second] & np.isfinite(distinct),
                        distinct, 0.0)
    # Pairs never separated rank after every separated pair (tied among themselves).
    late = len(steps)
    when = np.where(never, late, at).astype(float)
    rho = pval = None
    # With fewer separated pairs there is hardly an order of separation to correlate: one
    # such pair only ranks against the never-separated rest, tied last.
    separated = int(np.count_nonzero(~never))
    if (separated >= MIN_SEPARATED_PAIRS and np.ptp(when) > 0
            and np.ptp(distinct) > 0):
        res = stats.spearmanr(distinct, when)
        rho, pval = float(res.statistic), float(res.pvalue)
    # Earliest first, then the more distinct, then by the pair's names (Python's order of
    # the name tuples, through each name's rank).
    rank = {name: i for i, name in enumerate(sorted(set(classes)))}
    by_name = np.array([rank[name] for name in classes])
    order = np.lexsort((by_name[second], by_name[first], -distinct, when))
    final = acc[-1, first, second]
    pairs = [
        PairSeparation(
            pair=(classes[a], classes[b]),
            separated_at_step=None if nv else steps[t],
            separated_at_checkpoint=None if nv else t,
            distinctness=d,
            final_pairwise_accuracy=f,
        )
        for a, b, t, nv, d, f in zip(first[order].tolist(), second[order].tolist(),
                                     at[order].tolist(), never[order].tolist(),
                                     distinct[order].tolist(), final[order].tolist(),
                                     strict=True)
    ]
    return LearningOrder(pairs=tuple(pairs), spearman=rho, p_value=pval, n_pairs=len(pairs))
