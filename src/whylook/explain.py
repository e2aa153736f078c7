"""Steps 1-6 end to end: from a run folder to ``analysis/explanation.json`` and
``analysis/arrays.npz``.

Every expensive stage works on shards (one checkpoint × a slice of the analysis set) and
caches each shard under ``analysis/cache`` keyed by the digests of its exact inputs, so an
interrupted ``whylook explain`` resumes where it stopped and a changed input never reuses
a stale result. The final files are written atomically, ``explanation.json`` last, so a
folder that holds it holds a complete analysis.
"""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from whylook import __version__
from whylook._checks import is_number, is_whole
from whylook._io import (
    file_digest,
    json_bytes,
    read_json,
    remove_temporaries,
    run_lock,
    save_npz,
    write_bytes,
)
from whylook._memory import small_pages
from whylook._progress import StageBar, progress_bar
from whylook._text import (
    floor_pct,
    near_chance_caution,
    pair_confusion_text,
    rank_classes,
    uncertain_entries_by_class,
    uncertain_null_lines,
)
from whylook.errors import WhylookError, option
from whylook.saliency import check_precision_name, precision_key
from whylook.structure import (
    MIN_SEPARATED_PAIRS,
    UNSEEN_NOTE,
    StructureSettings,
    UncertainPrototype,
    assemble,
    blank_maps,
    class_accuracy,
    confusion_matrix,
    order_correlation_of,
    prototype_id,
    records_separation,
    uncertain_rule,
)

__all__ = [
    "ExplainSettings",
    "Explanation",
    "UncertainNull",
    "explain",
    "load_explanation",
    "prototype_rows",
    "stratified_rows",
    "uncertain_by_chance",
]

SCHEMA = "whylook.explanation/1"
# Bump when a stage's output for the same inputs changes, so old caches are not reused.
_CACHE_VERSION = "1"
# The final model's features of the analysis set are held, up to this size, from the final
# checkpoint's Grad-CAM pass until the prototypes exist to assign them (ResNet-50 at
# layer3: 2000 samples take 400 MB), instead of a second feature pass over them.
_HELD_FEATURES_BYTES = 1 << 29
# The printed summary lists this many uncertain-prototype entries (the rest: it says how many).
_UNCERTAIN_LISTED = 10
# ... and this many classes (a 1000-class model's summary was 1000 lines): those in the
# most uncertain entries, as the report draws them; and this many class names per list.
_CLASSES_LISTED = 30
_NAMES_LISTED = 10


#: The readings of "support for class c" (ExplainSettings.support).
SUPPORT_READINGS = ("global+class", "global", "class")


@dataclass(frozen=True)
class ExplainSettings:
    """Every choice of Steps 1-6 that a user can change; each one that can change a result
    is recorded in ``explanation.json``'s ``settings`` (``shard_size``, the work's split into
    cached parts, cannot and is not)."""

    k: int | str = "default"
    layer: str | None = None
    analysis_size: int | None = None
    prototype_size: int | None = None
    seed: int = 0
    batch_size: int = 256
    shard_size: int = 2048
    n_components: int | None = None
    min_cluster_size: int | None = None
    ridge_lambda: float | Literal["cv"] = "cv"
    # docs/METHOD-NOTES.md, Step 5: how β's noise is measured, the exact jackknife by
    # default; "bootstrap" draws `bootstrap` resamples instead (the default before
    # 2026-12-05; Step 5 then takes 4.4x as long).
    standard_errors: Literal["jackknife", "bootstrap"] = "jackknife"
    bootstrap: int = 100
    # docs/METHOD-NOTES.md: "support for class c", weighted by class c's learning phase,
    # from the global beta and the class-conditional ridge fits, whichever has the larger
    # z against a Bonferroni-corrected threshold ("global+class"), or from one of them
    # alone ("global", the paper's beta; "class"); class sub-groups from the confidence
    # trajectories plus the final prototype profile ("trajectory+profile") or from the
    # trajectories alone, as docs/METHOD-NOTES.md reads the paper ("trajectory").
    support: str = "global+class"
    subgroups: str = "trajectory+profile"
    structure: StructureSettings = field(default_factory=StructureSettings)
    # docs/METHOD-NOTES.md, Step 6: how many times to refit Step 5 with the link between
    # attention and confidence cut, by a sign flip and by a shuffle, and count what the
    # uncertain rule flags then (0: not measured; each draw costs two more Step-5 fits).
    uncertain_null: int = 0
    # The arithmetic of the Grad-CAM and feature passes: "float32" (exact) or "bfloat16"
    # (torch.autocast's mixed precision, the CAM and softmax in float32;
    # whylook/saliency.py). Not part of the method, but it moves its inputs slightly, so
    # it is recorded and keys the cache.
    precision: str = "float32"

    def __post_init__(self) -> None:
        _check_settings(self)


@dataclass(frozen=True, eq=False)
class Explanation:
    """The result of :func:`explain`: the content of ``explanation.json`` and the arrays.

    ``data`` is the parsed ``explanation.json``; ``arrays`` maps the names of
    ``arrays.npz`` (docs/ARCHITECTURE.md lists them, with their shapes) to numpy arrays.
    Arrays over samples have one row per analysed sample: :meth:`row` finds a training
    image's row, so ``arrays["saliency"][t, exp.row(i)]`` is image ``i``'s Grad-CAM at
    checkpoint ``t``.

    >>> exp = Explanation(Path("runs/a/analysis"), {
    ...     "classes": ["cat", "dog"], "k": 4,
    ...     "classes_explained": [{"class": "cat", "shared": ["P-1"]},
    ...                           {"class": "dog", "shared": ["P-0", "P-3"]}],
    ...     "uncertain_prototypes": [], "learning_order": []},
    ...     {"sample_index": np.array([40, 7, 12])})
    >>> exp.for_class("dog")["shared"], exp.for_class(0)["shared"]
    (['P-0', 'P-3'], ['P-1'])
    >>> exp.row(7)
    1
    """

    path: Path
    data: dict[str, Any] = field(repr=False)
    arrays: dict[str, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        # A result, not a workspace: an in-place edit (exp.arrays["beta"] *= 2) would make
        # it disagree with the files it came from and with what the report shows.
        # Views: the flag is this result's, and a caller's own arrays stay writable.
        views = {k: v.view() if isinstance(v, np.ndarray) else v for k, v in self.arrays.items()}
        for value in views.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
        object.__setattr__(self, "arrays", views)

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    def for_class(self, c: str | int) -> dict[str, Any]:
        """Class ``c``'s entry of ``classes_explained`` (shared and specialized prototypes,
        ...), ``c`` named as in :attr:`classes`, or by its index there when no class has
        that name."""
        names = self.classes
        # A class named "1" is class "1", whatever its position; a number that names no
        # class is a position.
        name = str(c) if str(c) in names or not is_whole(c) or not 0 <= c < len(names) else names[c]
        for entry in self.data["classes_explained"]:
            if entry["class"] == name:
                return dict(entry)
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise WhylookError(f"class {c!r} is not one of the {len(names)} classes ({shown})")

    @property
    def uncertain_prototypes(self) -> list[dict[str, Any]]:
        """The uncertain entries: a prototype, the two classes it swings between, when."""
        return [dict(u) for u in self.data["uncertain_prototypes"]]

    @property
    def learning_order(self) -> list[dict[str, Any]]:
        """Each class pair and the step at which the model separated it."""
        return [dict(e) for e in self.data["learning_order"]]

    def row(self, sample: int) -> int:
        """The row of the arrays that holds training image ``sample`` (its index in the
        training split), or a one-line error when it was not analysed."""
        index = self.arrays["sample_index"]
        hits = np.flatnonzero(index == sample) if is_whole(sample) else np.empty(0, np.int64)
        if hits.size == 0:
            raise WhylookError(
                f"training image {sample!r} is not in the analysis set; its "
                f"{len(index)} images are arrays['sample_index']"
            )
        return int(hits[0])

    @property
    def k(self) -> int:
        return int(self.data["k"])

    @property
    def precision(self) -> str:
        """The arithmetic of its passes (``ExplainSettings.precision``); passes that must
        match its prototypes use the same. Older runs: float32."""
        return str(self.data["settings"].get("precision", "float32"))

    def summary(self) -> str:
        """A short human summary: shared prototypes per class, uncertain prototypes,
        learning order and its correlation."""
        d = self.data
        lines = [
            f"whylook explanation: {len(d['classes'])} classes, K={d['k']} prototypes at "
            f"layer {d['layer']} ({d['grid'][0]}x{d['grid'][1]}), {len(d['checkpoints'])} "
            f"checkpoints, {d['settings']['analysis_size']} samples"
            + ("" if self.precision == "float32"
               else f"; passes in {self.precision}"),
        ]
        weak = _near_chance_text(d)
        if weak:
            lines.append(weak)
        lines += ["", "Shared prototypes per class (strongest first):"]
        listed = _classes_listed(d, self.arrays)
        for c in listed:
            shared = _listed(c["shared"], 6) or _no_shared_text(c.get("why_no_shared"))
            spec = "; ".join(
                f"group {g['group']} (n={g['size']}): {', '.join(g['prototypes'])}"
                for g in c["specialized"]
            )
            lines.append(f"  {c['class']:>12}: {shared}" + (f"  | specialized: {spec}" if spec
                                                             else ""))
        if len(listed) < len(d["classes_explained"]):
            lines.append(f"  ... {len(d['classes_explained']) - len(listed)} more classes in "
                         "explanation.json and the report (listed: those in the most "
                         "uncertain entries)")
        unseen = _unseen_text(d["classes_explained"])
        if unseen:
            lines.append(unseen)
        unc = d["uncertain_prototypes"]
        lines.append("")
        n_unc = len({u["id"] for u in unc})
        # A pair can hold several uncertain prototypes: count the pairs, not the entries.
        n_pairs = len({tuple(sorted(u["classes"])) for u in unc})
        lines.append(f"Uncertain prototypes: {n_unc} of {d['k']} on {n_pairs} class pairs "
                     f"({len(unc)} prototype-pair entries)")
        check = _pair_confusion_text(d.get("uncertain_pairs_confusion"))
        if check:
            lines.append(check)
        lines += [f"  {line}" for line in uncertain_null_lines(d.get("uncertain_by_chance"))]
        for u in unc[:_UNCERTAIN_LISTED]:
            lines.append(
                f"  {u['id']}: swings {u['swings']}x between {u['classes'][0]} and "
                f"{u['classes'][1]} (at step{'s' if len(u['steps']) != 1 else ''} "
                f"{', '.join(map(str, u['steps']))})"
            )
        if len(unc) > _UNCERTAIN_LISTED:
            lines.append(f"  ... {len(unc) - _UNCERTAIN_LISTED} more entries in "
                         "explanation.json and the report")
        order = d["learning_order"]
        lines.append("")
        names = [f"{p['pair'][0]}/{p['pair'][1]}" for p in order if records_separation(p)]
        never = len(order) - len(names)
        if len(names) <= 10:  # first five and last five would name some pairs twice
            text = f"separated {', '.join(names)} (first to last)" if names else "none separated"
        else:
            text = f"first separated {', '.join(names[:5])}; last {', '.join(names[-5:])}"
        lines.append(f"Learning order: {text}"
                     + (f"; {never} pair{'s' if never != 1 else ''} never separated" if never
                        else ""))
        separated, rho, p_value = order_correlation_of(d)
        if separated < MIN_SEPARATED_PAIRS:
            lines.append(f"  distinctness vs separation: not measurable ({separated} "
                         f"pair{'s' if separated != 1 else ''} separated; at least "
                         f"{MIN_SEPARATED_PAIRS} needed)")
        elif rho is None:
            lines.append("  distinctness vs separation: not measurable (no variation)")
        else:
            lines.append(
                f"  Spearman(distinctness, separation checkpoint) = {rho:+.3f} "
                f"({_p_text(p_value)}, {len(order)} pairs; "
                "negative = more distinct pairs separated first)"
            )
        lines.append(f"\nwritten to {self.path}")
        return "\n".join(lines)


def _pair_confusion_text(check: dict[str, Any] | None) -> str | None:
    """The summary's line on ``uncertain_pairs_confusion`` (files written before
    2026-12-05 have none)."""
    if not check or check.get("lift") is None:
        return None
    return "  " + pair_confusion_text(float(check["lift"]))


def _listed(ids: list[str], limit: int) -> str:
    """The first ``limit`` ids, and how many the summary leaves out (never silently)."""
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def _near_chance_text(d: dict[str, Any]) -> str | None:
    acc = (d["checkpoints"][-1] if d["checkpoints"] else {}).get("analysis_accuracy")
    if not isinstance(acc, int | float):
        return None  # an explanation written before the field existed
    run = d.get("run")
    source = run.get("source") if isinstance(run, dict) else None
    caution = near_chance_caution(float(acc), len(d["classes"]), source=source)
    return None if caution is None else f"  Caution: {caution}"


def _p_text(p: float | None) -> str:
    if p is None:
        return "p not recorded"
    # explanation.json keeps 6 decimals: a p-value below that reads as 0 there.
    return f"p = {p:.3g}" if p > 0 else "p < 1e-06"


def _classes_listed(d: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The classes the summary lists, in their order: all, or past ``_CLASSES_LISTED`` the
    ones the report draws (``_text.rank_classes``: most uncertain-prototype entries, then
    least accurate; without the arrays, then the first classes)."""
    classes = d["classes_explained"]
    if len(classes) <= _CLASSES_LISTED:
        return classes
    entries = uncertain_entries_by_class(d["uncertain_prototypes"])
    accuracy: list[float | None] = [None] * len(classes)
    if "confidence" in arrays and "labels" in arrays:
        accuracy = class_accuracy(arrays["confidence"][-1], arrays["labels"], len(classes))
    ranked = rank_classes([len(entries.get(str(c["class"]), [])) for c in classes], accuracy)
    return [classes[i] for i in sorted(ranked[:_CLASSES_LISTED])]


def _unseen_text(classes: list[dict[str, Any]]) -> str | None:
    """A line naming the classes learned mostly while their Grad-CAM maps were all zero."""
    named = [(c["class"], c["learning_unseen"]) for c in classes
             if (c.get("learning_unseen") or 0.0) >= UNSEEN_NOTE]
    if not named:
        return None
    listed = _listed([f"{name} ({floor_pct(u)})" for name, u in named], _NAMES_LISTED)
    return (f"  Learning unseen (Grad-CAM all zero): {listed} of the class's learning;\n"
            "    their support rests on the rest of it and on other classes' samples")


def _also_text(candidate: dict[str, Any]) -> str:
    also = candidate.get("also_active_in") or []  # absent in files written before it
    return f"; also most of {_listed([str(c) for c in also], _NAMES_LISTED)}" if also else ""


def _no_shared_text(why: dict[str, Any] | None) -> str:
    """One line on why a class has no shared prototype (explanation.json's diagnosis)."""
    if not why:  # written before the diagnosis existed
        return "(none above noise)"
    looked = ", ".join(f"{c['id']} ({floor_pct(c['active_rate'])}, z {c['support_z']:+.1f}"
                       + _also_text(c) + ")" for c in why["most_active"])
    if why.get("activity_met", True):
        verb = "lacks" if len(why["most_active"]) == 1 else "lack"
        text = f"none: most looked-at {looked} {verb} support"
    else:
        text = f"none: no prototype is looked at in most of its samples (most: {looked})"
    best = why["best_supported"]
    if best is None:
        return text + "; no prototype's support clears noise"
    # best_supported: of the prototypes whose support clears noise, the most looked-at one.
    return (text + f"; the most looked-at with support, {best['id']} (z "
            f"{best['support_z']:+.1f}), is looked at in {floor_pct(best['active_rate'])}")


def stratified_rows(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A deterministic, class-stratified choice of ``size`` rows, sorted.

    Each class gets a share proportional to its frequency (largest remainder), and its
    rows are a seeded permutation prefix, so the choice is the same on every machine.

    Example:
        >>> stratified_rows(np.array([0, 0, 0, 1, 1, 1]), 4, seed=0).shape
        (4,)
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 1 <= size <= n:
        raise WhylookError(f"a subset of {size} samples cannot be drawn from {n}; choose 1..{n}")
    if size == n:
        return np.arange(n, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / n
    take = np.floor(exact).astype(int)
    rest = size - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:rest]] += 1
    rng = np.random.default_rng(seed)
    chosen = []
    for c, t in zip(classes, take, strict=True):
        rows = np.flatnonzero(labels == c)
        chosen.append(rows[rng.permutation(len(rows))[:t]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def prototype_rows(labels: np.ndarray, rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The prototype set of an analysis set ``rows``: nested with it, sorted.

    The method's default is the analysis set itself. A smaller set is a stratified part of it;
    a larger one is the analysis set plus a stratified choice of the other rows. Nesting
    lets the final checkpoint's Grad-CAM pass supply the features of both.

    Example:
        >>> labels = np.array([0, 1] * 10)
        >>> rows = stratified_rows(labels, 6, seed=0)
        >>> bool(np.isin(rows, prototype_rows(labels, rows, 10, seed=0)).all())
        True
    """
    labels = np.asarray(labels)
    if size == len(rows):
        return rows
    if size < len(rows):
        return rows[stratified_rows(labels[rows], size, seed + 1)]
    rest = np.setdiff1d(np.arange(len(labels), dtype=np.int64), rows)
    extra = rest[stratified_rows(labels[rest], size - len(rows), seed + 1)]
    return np.union1d(rows, extra).astype(np.int64)


def _masked(feats: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """The rows of ``feats`` where ``mask`` is set, on their device (no copy if all are)."""
    if mask.all():
        return feats
    return feats.index_select(0, torch.from_numpy(np.flatnonzero(mask)).to(feats.device))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _shards(n: int, size: int) -> Iterator[tuple[int, slice]]:
    for i, start in enumerate(range(0, n, size)):
        yield i, slice(start, min(n, start + size))


def explain(
    run: str | Path | Any,
    *,
    k: int | str = "default",
    layer: str | None = None,
    analysis_size: int | None = None,
    prototype_size: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    settings: ExplainSettings | None = None,
    progress: bool | None = None,
) -> Explanation:
    """Compute the structured explanation of a run folder (Steps 1-6 of the method).

    Args:
        run: a run folder (path or :class:`whylook.run.RunFolder`) with at least 3
            checkpoints.
        k: number of prototypes, ``"default"`` (the paper's: 32 for grayscale, 128 for
            RGB data) or ``"auto"`` (chosen from the data).
        layer: the prototype layer (default: the run's).
        analysis_size: samples of the training split to analyse (default: min(2000, N)).
        prototype_size: samples whose features define the prototypes (default: the
            analysis size; may be up to the whole training split).
        seed: seed of the sample choice, K-Means and the bootstrap (default: the
            settings', 0).
        device: ``auto``, ``cpu`` or ``cuda``.
        settings: every other choice; the keyword arguments above override it.

    Returns:
        The :class:`Explanation`, also written to ``RUN/analysis``.

    Example:
        On a trained run (``runs/a`` from the package's example); analysed again with the
        same settings, it reads what the first call cached:

        >>> import whylook
        >>> exp = whylook.explain("runs/a")  # doctest: +SKIP
        >>> exp.classes[:3], exp.arrays["beta"].shape  # (T, K, M)  # doctest: +SKIP
        (['0', '1', '2'], (11, 32, 10))
        >>> sorted(exp.data["classes_explained"][0])  # doctest: +SKIP +NORMALIZE_WHITESPACE
        ['class', 'learning_unseen', 'n', 'shared', 'shared_strength', 'specialized',
         'why_no_shared']
    """
    from whylook.models import resolve_device
    from whylook.run import RunFolder

    base = settings if settings is not None else ExplainSettings()
    if not isinstance(base, ExplainSettings):
        raise WhylookError(f"settings must be an ExplainSettings, not {type(base).__name__}")
    # "is None", not "or": a size of 0 is a bad input, not a request for the default.
    settings = ExplainSettings(
        **{**asdict(base), "structure": base.structure,
           "k": base.k if isinstance(k, str) and k == "default" else k,
           "layer": base.layer if layer is None else layer,
           "analysis_size": base.analysis_size if analysis_size is None else analysis_size,
           "prototype_size": base.prototype_size if prototype_size is None else prototype_size,
           "seed": base.seed if seed is None else seed}
    )
    folder = run if isinstance(run, RunFolder) else RunFolder.open(run)
    # Under a caller's inference_mode the checkpoints would load as inference tensors,
    # which Grad-CAM's backward cannot go through.
    # Small pages: see whylook/_memory.py (the K-Means fit alone is not enough, as the
    # heap keeps the huge-page advice of arrays made before it).
    with run_lock(folder.path), torch.inference_mode(False), small_pages():
        return _explain_locked(folder, settings, resolve_device(device), progress)


def _check_settings(s: ExplainSettings) -> None:
    """Refuse malformed options when they are set, long before the work that uses them,
    each with a one-line message."""
    from whylook.train import check_seed

    k_ok = s.k in {"default", "auto"} if isinstance(s.k, str) else is_whole(s.k) and s.k >= 2
    if not k_ok:
        raise WhylookError(f"k must be a whole number >= 2, 'default' or 'auto', not {s.k!r}")
    if s.layer is not None and not (isinstance(s.layer, str) and s.layer):
        raise WhylookError(f"layer must be a layer name, not {s.layer!r}")
    for name, value, low in (
        ("analysis_size", s.analysis_size, 1),
        ("prototype_size", s.prototype_size, 1),
        ("n_components", s.n_components, 1),
        ("min_cluster_size", s.min_cluster_size, 2),
        ("batch_size", s.batch_size, 1),
        ("shard_size", s.shard_size, 1),
        ("uncertain_null", s.uncertain_null, 0),
    ):
        optional = name not in {"batch_size", "shard_size", "uncertain_null"}
        if (value is None and not optional) or (
            value is not None and not (is_whole(value) and value >= low)
        ):
            raise WhylookError(f"{name} must be a whole number >= {low}, not {value!r}")
    check_seed("seed", s.seed)  # scikit-learn's random states take 32-bit seeds
    if not (is_whole(s.bootstrap) and (s.bootstrap == 0 or s.bootstrap >= 2)):
        raise WhylookError(f"bootstrap must be 0 or a whole number >= 2, not {s.bootstrap!r}")
    if s.standard_errors not in ("jackknife", "bootstrap"):
        raise WhylookError(
            f"standard_errors must be 'jackknife' or 'bootstrap', not {s.standard_errors!r}"
        )
    lam = s.ridge_lambda
    if not (isinstance(lam, str) and lam == "cv") and not (
        is_number(lam) and np.isfinite(lam) and lam >= 0
    ):
        raise WhylookError(f"ridge_lambda must be 'cv' or a number >= 0, not {lam!r}")
    if not isinstance(s.structure, StructureSettings):
        raise WhylookError(
            f"structure must be a StructureSettings, not {type(s.structure).__name__}"
        )
    if s.support not in SUPPORT_READINGS:
        raise WhylookError(
            f"support must be one of {', '.join(map(repr, SUPPORT_READINGS))}, not {s.support!r}"
        )
    if s.subgroups not in ("trajectory+profile", "trajectory"):
        raise WhylookError(
            f"subgroups must be 'trajectory+profile' or 'trajectory', not {s.subgroups!r}"
        )
    check_precision_name(s.precision)


@dataclass(frozen=True)
class UncertainNull:
    """What the uncertain rule flags on Step-5 refits that break the link between
    attention and confidence, two ways (:func:`uncertain_by_chance`).

    Attributes:
        sign_flipped: entries flagged after each refit with every sample's confidence
            changes multiplied by a random sign (the same for all its transitions and
            classes): the true coefficients are all zero, so this is chance alone.
        shuffled: entries flagged after each refit with every sample's intensity changes
            given to another sample (one shuffle for all transitions): each class's and
            prototype's average change per transition survives, and the paper's ridge,
            which has no intercept, credits a prototype whose attention rose on average
            with whatever the confidences did on average. This is the drift alone.
        in_shuffles: for each real entry ``(prototype id, class, class)`` also flagged
            under some shuffle, in how many of them.
    """

    sign_flipped: tuple[int, ...]
    shuffled: tuple[int, ...]
    in_shuffles: dict[tuple[str, str, str], int]

    def to_json(self) -> dict[str, Any]:
        return {
            "draws": len(self.shuffled),
            "sign_flipped": list(self.sign_flipped),
            "sign_flipped_mean": round(float(np.mean(self.sign_flipped)), 6),
            "shuffled": list(self.shuffled),
            "shuffled_mean": round(float(np.mean(self.shuffled)), 6),
            "entries_in_shuffles": [
                {"id": key[0], "classes": list(key[1:]), "shuffles": n}
                for key, n in self.in_shuffles.items()
            ],
        }


def uncertain_by_chance(
    d_intensity: np.ndarray,
    d_confidence: np.ndarray,
    active_rate: np.ndarray,
    classes: Sequence[str],
    steps: Sequence[int],
    settings: ExplainSettings,
    *,
    flagged: Sequence[tuple[str, str, str]] = (),
    n_jobs: int | None = None,
    progress: bool | None = False,
) -> UncertainNull | None:
    """The uncertain rule on ``settings.uncertain_null`` pairs of refits of Step 5 that
    cut the link between the intensity changes ``(T, n, K)`` and the confidence changes
    ``(T, n, M)``: one with each sample's confidence changes sign-flipped (chance), one
    with its intensity changes given to another sample (the average drift), see
    :class:`UncertainNull` and docs/METHOD-NOTES.md, Step 6. Step 5 is refitted with
    ``settings``' ridge penalty and standard errors; the active rates ``(K, M)`` are the
    real run's, so the rule runs the same prototype-pair tests. ``flagged`` are the real
    run's entries, ``(prototype id, class, class)``, counted in the shuffles. ``None``
    when ``settings.uncertain_null`` is 0.

    >>> rng = np.random.default_rng(0)
    >>> t, n = 4, 400
    >>> dp = rng.normal(1.0, 0.3, (t, n, 1))  # attention to P-0 rises in every sample
    >>> drift = np.array([1.0, -2.0, 2.0, -2.0])[:, None]  # a, b take turns gaining
    >>> dy = np.stack([drift, -drift], axis=2) + rng.normal(0, 0.3, (t, n, 2))
    >>> null = uncertain_by_chance(dp, dy, np.ones((1, 2)), ["a", "b"], range(t + 1),
    ...                            ExplainSettings(uncertain_null=3),
    ...                            flagged=[("P-0", "a", "b")])
    >>> null.sign_flipped, null.shuffled, null.in_shuffles
    ((0, 0, 0), (1, 1, 1), {('P-0', 'a', 'b'): 3})
    """
    from whylook.mapping import fit_mapping

    if not settings.uncertain_null:
        return None
    d_intensity = np.asarray(d_intensity, dtype=np.float64)
    d_confidence = np.asarray(d_confidence, dtype=np.float64)
    classes, steps = list(classes), list(steps)
    rng = np.random.default_rng([settings.seed, 6])
    n = d_intensity.shape[1]

    def rule(dp: np.ndarray, dy: np.ndarray) -> tuple[UncertainPrototype, ...]:
        refit = fit_mapping(dp, dy, lam=settings.ridge_lambda,
                            standard_errors=settings.standard_errors,
                            n_boot=settings.bootstrap, seed=settings.seed, n_jobs=n_jobs)
        return uncertain_rule(refit.beta, refit.beta_se, active_rate, classes, steps,
                              settings.structure, refit.lead_errors)

    sign_flipped, shuffled = [], []
    in_shuffles = dict.fromkeys(flagged, 0)
    for _ in progress_bar(range(settings.uncertain_null), desc="uncertain rule: nulls",
                          total=settings.uncertain_null, progress=progress):
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        sign_flipped.append(len(rule(d_intensity, d_confidence * signs[None, :, None])))
        found = rule(d_intensity[:, rng.permutation(n)], d_confidence)
        shuffled.append(len(found))
        for u in found:
            key = (u.id, *u.classes)
            if key in in_shuffles:
                in_shuffles[key] += 1
    return UncertainNull(tuple(sign_flipped), tuple(shuffled),
                         {key: c for key, c in in_shuffles.items() if c})


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    """A cached stage result, or None when absent or unreadable (then it is recomputed).

    Cache files are written atomically, so an unreadable one was damaged from outside
    (a copy cut short, a full disk); recomputing it is always safe.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {name: z[name] for name in z.files}
    except Exception:  # numpy raises OSError, ValueError, BadZipFile, EOFError, ...
        return None


def _explain_locked(folder: Any, settings: ExplainSettings, device: torch.device,
                    progress: bool | None) -> Explanation:
    from whylook import intensity as inten
    from whylook.mapping import fit_class_mapping, fit_mapping
    from whylook.models import get_layer, layer_shape
    from whylook.patterns import describe_groups, find_patterns
    from whylook.prototypes import (
        INIT_VECTORS,
        REFINE_ITER,
        PrototypeFinder,
        Prototypes,
        default_k,
        kmeans_algorithm,
    )
    from whylook.run import MIN_CHECKPOINTS
    from whylook.saliency import GradCAM, SaliencyResult, layer_features

    ckpts = folder.checkpoints
    if len(ckpts) < MIN_CHECKPOINTS:
        raise WhylookError(
            f"run {folder.path} has {len(ckpts)} checkpoints; the analysis needs at least "
            f"{MIN_CHECKPOINTS} (train or import the run again with {MIN_CHECKPOINTS} or more)"
        )
    data = folder.data()
    train = data.train
    n_train = len(train.labels)
    classes = tuple(folder.classes)
    m = len(classes)
    layer_name = settings.layer or folder.layer
    analysis_size = settings.analysis_size or min(2000, n_train)
    prototype_size = settings.prototype_size or analysis_size
    for name, size in ((option("analysis-size"), analysis_size),
                       (option("prototype-size"), prototype_size)):
        if not 1 <= size <= n_train:
            raise WhylookError(
                f"{name} {size} is out of range: the training split has {n_train} samples"
            )

    final = folder.load_model(len(ckpts) - 1, device=str(device))
    get_layer(final, layer_name)  # unknown names fail here with the list of candidates
    d, h, w = layer_shape(final, layer_name, (data.channels, *data.image_size))
    if settings.k == "default":
        k_value: int | Literal["auto"] = default_k(data.channels)
        k_choice = "default"
    elif settings.k == "auto":
        k_value, k_choice = "auto", "auto"
    else:
        k_value, k_choice = int(settings.k), "user"
    if isinstance(k_value, int) and k_value > prototype_size * h * w:
        raise WhylookError(
            f"K={k_value} is larger than the {prototype_size * h * w} feature vectors of the "
            f"prototype set; choose a smaller {option('k')} or a larger {option('prototype-size')}"
        )

    rows = stratified_rows(train.labels, analysis_size, settings.seed)
    proto_rows = prototype_rows(train.labels, rows, prototype_size, settings.seed)
    labels = train.labels[rows].astype(np.int64)
    if np.bincount(labels, minlength=m).min() == 0:
        raise WhylookError(
            f"the analysis set misses a class; raise {option('analysis-size')} so that every class "
            "is represented"
        )

    analysis_dir = folder.path / "analysis"
    cache = analysis_dir / "cache"
    # A killed explain's temporary files (this holds the run's lock).
    remove_temporaries(analysis_dir)
    remove_temporaries(cache)
    digests = [file_digest(folder.path / c.file) for c in ckpts]
    common = {"v": _CACHE_VERSION, "layer": layer_name, "data": folder.config.get("data"),
              **precision_key(settings.precision)}

    # Step 1 (prototypes) and Step 2 (saliency) share the final checkpoint's pass: its
    # Grad-CAM already computes the layer's features, which are the prototype set's
    # features wherever the two sets overlap (by default they are the same set), so the
    # final model runs over them once. The final checkpoint comes first for that reason.
    # The K-Means recipe is part of the key: prototypes cached by a version that fitted
    # them another way are recomputed, not reused (the saliency shards stay valid). The
    # algorithm is decided once: the key, the fit and explanation.json name the same one.
    algorithm = kmeans_algorithm()
    proto_key = _digest({**common, "ckpt": digests[-1], "rows": _digest(proto_rows.tolist()),
                         "k": k_value, "p": settings.n_components, "seed": settings.seed,
                         "kmeans": [INIT_VECTORS, REFINE_ITER, algorithm]})
    proto_file = cache / f"prototypes-{proto_key[:20]}.npz"
    cached = _load_cached(proto_file)
    prototypes = None if cached is None else Prototypes.from_arrays(cached)
    finder = None
    if prototypes is None:
        finder = PrototypeFinder(k=k_value, n_components=settings.n_components,
                                 seed=settings.seed, algorithm=algorithm)
    in_proto = np.isin(rows, proto_rows)
    fed = np.zeros(len(proto_rows), dtype=bool)  # prototype rows the finder has seen
    # Final-model features of analysis rows (with their positions in the analysis set),
    # held until the prototypes exist to assign them; past the budget a shard gets a
    # feature pass of its own later (same result).
    held: list[tuple[np.ndarray, torch.Tensor]] = []
    held_bytes = 0

    assignments = np.zeros((len(rows), h, w), dtype=np.int16)
    assigned = np.zeros(len(rows), dtype=bool)

    def assign_or_hold(positions: np.ndarray, feats: torch.Tensor) -> None:
        # feats stay on the model's device: on a GPU the statistics and assignments run
        # there (ResNet-50's layer3 features of 2000 samples are 400 MB).
        nonlocal held_bytes
        size = feats.element_size() * feats.nelement()
        if prototypes is not None:
            assignments[positions] = prototypes.assign(feats)
            assigned[positions] = True
        elif held_bytes + size <= _HELD_FEATURES_BYTES:
            held.append((positions, feats))
            held_bytes += size

    def take_features(at: int, feats: torch.Tensor) -> None:
        batch_rows = rows[at:at + len(feats)]
        if finder is not None:
            # Global row numbers make the K-Means subsample independent of batching.
            mine = in_proto[at:at + len(feats)]
            if mine.any():
                finder.partial_fit(_masked(feats, mine), sample_index=batch_rows[mine])
            fed[np.searchsorted(proto_rows, batch_rows[mine])] = True
        assign_or_hold(np.arange(at, at + len(feats)), feats)

    def finish_prototypes() -> Prototypes:
        assert finder is not None
        rest = proto_rows[~fed]
        if rest.size:
            # Prototype rows that no fresh final-checkpoint pass covered: those beyond
            # the analysis set, or in shards read from the cache. rows= gathers batch by
            # batch, so even the whole training split is never copied: memory stays flat.
            batches = progress_bar(
                # The outer bar names the stage; the feature pass's own would repeat it.
                layer_features(final, layer_name, train.images, rows=rest,
                               batch_size=settings.batch_size, device=device,
                               precision=settings.precision, progress=False),
                desc="prototypes: features", total=-(-len(rest) // settings.batch_size),
                progress=progress,
            )
            start = 0
            for feats in batches:
                batch_rows = rest[start:start + len(feats)]
                start += len(feats)
                finder.partial_fit(feats, sample_index=batch_rows)
                # The analysis rows among them need these features for their assignments.
                at = np.minimum(np.searchsorted(rows, batch_rows), len(rows) - 1)
                analysed = rows[at] == batch_rows
                if analysed.any():
                    assign_or_hold(at[analysed], _masked(feats, analysed))
        fitted = finder.finalize(progress=progress)
        save_npz(proto_file, fitted.to_arrays())
        for positions, feats in held:
            assignments[positions] = fitted.assign(feats)
            assigned[positions] = True
        held.clear()
        return fitted

    # Step 2: saliency and confidences at every checkpoint, one cached shard at a time.
    t1 = len(ckpts)
    n = len(rows)
    saliency = np.zeros((t1, n, h, w), dtype=np.float32)
    confidence = np.zeros((t1, n, m), dtype=np.float32)
    shards = list(_shards(n, settings.shard_size))
    rows_digest = _digest(rows.tolist())
    jobs = [(t, s, sl) for t in (t1 - 1, *range(t1 - 1)) for s, sl in shards]
    scratch: list[torch.nn.Module] = []  # one model object for all earlier checkpoints
    for t, s, sl in progress_bar(jobs, desc="saliency: checkpoints x shards", total=len(jobs),
                                 progress=progress):
        if t != t1 - 1 and prototypes is None:
            prototypes = finish_prototypes()
        key = _digest({**common, "ckpt": digests[t], "rows": rows_digest, "shard": s,
                       "size": settings.shard_size})
        shard_file = cache / f"saliency-t{t:04d}-s{s:04d}-{key[:20]}.npz"
        cached = _load_cached(shard_file)
        if cached is not None and {"saliency", "confidence"} <= cached.keys():
            _check_finite(ckpts, t, cached["saliency"], cached["confidence"])
            saliency[t, sl], confidence[t, sl] = cached["saliency"], cached["confidence"]
            continue
        model = final if t == t1 - 1 else _checkpoint_model(folder, t, device, scratch)
        parts = []
        at = sl.start
        cam = GradCAM(model, layer_name, device=device, precision=settings.precision)
        try:
            if t == t1 - 1:
                for part, feats in cam.batches_with_features(
                    train.images, labels[sl], rows=rows[sl], batch_size=settings.batch_size
                ):
                    take_features(at, feats)
                    at += len(part)
                    parts.append(part)
            else:
                parts.extend(cam.batches(train.images, labels[sl], rows=rows[sl],
                                         batch_size=settings.batch_size))
        except WhylookError as exc:
            # Which of T+1 checkpoints failed (a diverged one returns NaN logits) is the
            # first thing the user needs to know.
            raise WhylookError(f"{_checkpoint_name(ckpts, t)}: {exc}") from None
        res = SaliencyResult.concat(parts)
        saliency[t, sl], confidence[t, sl] = res.saliency, res.confidence
        save_npz(shard_file, {"saliency": res.saliency, "confidence": res.confidence})
    if prototypes is None:
        prototypes = finish_prototypes()
    k_final = int(prototypes.k)
    for _, sl in shards:
        if assigned[sl].all():
            continue
        at = sl.start
        for f in layer_features(final, layer_name, train.images, rows=rows[sl],
                                batch_size=settings.batch_size, device=device,
                                precision=settings.precision):
            assignments[at:at + len(f)] = prototypes.assign(f)
            at += len(f)

    # Step 3: prototype intensity, its presence mask and the final saliency mass shares.
    intensity_result = inten.prototype_intensity(saliency, assignments, k_final)
    intensity, presence = intensity_result.values, intensity_result.presence
    mass_share = inten.mass_share(saliency[-1], assignments, k_final)
    activity = inten.activity(saliency[-1], assignments, k_final,
                              rule=settings.structure.active_rule)

    # After the passes come seconds to a minute of fits, with no loop a bar could follow.
    with StageBar("analysis", ["patterns (HDBSCAN)", "mapping (ridge)", "structure"],
                  progress=progress) as stages:
        # Step 4: learning patterns.
        stages.start("patterns (HDBSCAN)")
        profile = activity if settings.subgroups == "trajectory+profile" else None
        # The fits of Steps 4-5 are independent; they get as many threads as torch had.
        n_jobs = max(1, torch.get_num_threads())
        patterns = find_patterns(confidence, labels, min_cluster_size=settings.min_cluster_size,
                                 profile=profile, n_jobs=n_jobs)

        # Step 5: ridge mapping from intensity changes to confidence changes.
        stages.start("mapping (ridge)")
        d_intensity, d_confidence = inten.delta(intensity), inten.delta(confidence)
        mapping = fit_mapping(
            d_intensity, d_confidence, groups=patterns.groups,
            lam=settings.ridge_lambda, standard_errors=settings.standard_errors,
            n_boot=settings.bootstrap, seed=settings.seed, n_jobs=n_jobs,
        )
        class_mapping = None
        support_fits = []
        readings = settings.support.split("+")
        if "global" in readings:
            support_fits.append((mapping.beta, mapping.beta_se))
        if "class" in readings:
            class_mapping = fit_class_mapping(d_intensity, d_confidence, labels,
                                              lam=settings.ridge_lambda,
                                              standard_errors=settings.standard_errors,
                                              n_boot=settings.bootstrap,
                                              seed=settings.seed, n_jobs=n_jobs)
            support_fits.append((class_mapping.beta, class_mapping.beta_se))

        # Step 6: the structured explanation.
        stages.start("structure")
        steps = [int(c.step) for c in ckpts]
        structure = assemble(
            classes=classes, steps=steps, labels=labels, activity=activity,
            confidence=confidence, beta=mapping.beta, beta_se=mapping.beta_se,
            class_groups=patterns.class_groups, settings=settings.structure,
            support_fits=support_fits, zero_maps=blank_maps(saliency),
            lead_se=mapping.lead_errors,
        )

    by_chance = uncertain_by_chance(
        d_intensity, d_confidence, structure.active_rate_by_class, classes, steps, settings,
        flagged=[(u.id, *u.classes) for u in structure.uncertain], n_jobs=n_jobs,
        progress=progress,
    )

    predictions = confidence.argmax(axis=2)
    confusion = np.stack([confusion_matrix(labels, predictions[t], m) for t in range(t1)])

    active = structure.active
    top_samples = []
    for p in range(k_final):
        order = np.argsort(-activity[:, p], kind="stable")
        top_samples.append([int(r) for r in order[:8] if active[r, p]])

    arrays = {
        "sample_index": rows,
        "labels": labels,
        "assignments": assignments,
        "saliency": saliency,
        "intensity": intensity.astype(np.float32),
        "confidence": confidence,
        "beta": mapping.beta.astype(np.float32),
        "groups": patterns.groups.astype(np.int16),
        "beta_z": mapping.z.astype(np.float32),
        "beta_se": mapping.beta_se.astype(np.float32),
        "presence": presence.astype(bool),
        "mass_share": mass_share.astype(np.float32),
        "activity": activity.astype(np.float32),
        "active": active,
        "class_groups": patterns.class_groups.astype(np.int16),
        "confusion": confusion,
        "support": structure.support,
        "support_z": structure.support_z,
        # One row per reading named in settings.support, in that order.
        "support_z_by_fit": structure.support_z_by_fit,
        "prototype_rows": proto_rows,
        "zero_saliency_rate": structure.zero_saliency_rate,
    }
    # Step 5 fits every HDBSCAN group of every transition too (docs/METHOD-NOTES.md); nothing
    # in Step 6 reads them, so they are kept for the user, not thrown away.
    arrays.update(mapping.group_arrays())
    if class_mapping is not None:
        arrays["beta_class"] = class_mapping.beta
        arrays["beta_class_se"] = class_mapping.beta_se
    explanation = {
        "schema": SCHEMA,
        "run": {"data": folder.config.get("data"), "model": folder.config.get("model"),
                "layer": layer_name, "path": str(folder.path.name),
                # Whether whylook trained the model on its own inputs ("train") or the
                # user's training did ("import"): the summary's cautions depend on it.
                "source": folder.manifest.get("source")},
        "classes": list(classes),
        "checkpoints": [
            {"index": int(c.index), "step": int(c.step),
             # Imported checkpoints may not know their epoch or accuracy.
             "epoch": None if c.epoch is None else float(c.epoch),
             "test_accuracy": None if c.test_accuracy is None else float(c.test_accuracy),
             "analysis_accuracy": round(float((predictions[t] == labels).mean()), 6)}
            for t, c in enumerate(ckpts)
        ],
        "k": k_final,
        "k_choice": k_choice,
        "layer": layer_name,
        "grid": [int(h), int(w)],
        "feature_dim": int(d),
        "settings": {
            "analysis_size": int(analysis_size),
            "prototype_size": int(prototype_size),
            "seed": int(settings.seed),
            "n_components": int(prototypes.components.shape[0]),
            "explained_variance": round(float(np.sum(prototypes.explained_variance_ratio)), 6),
            # Exact either way; chosen by CPU (prototypes.kmeans_algorithm), it can break a
            # tie in the K-Means partition otherwise than another machine.
            "kmeans_algorithm": algorithm,
            "min_cluster_size": int(patterns.min_cluster_size),
            "ridge_lambda": settings.ridge_lambda,
            "standard_errors": settings.standard_errors,
            "bootstrap": int(settings.bootstrap),
            "support": settings.support,
            "support_threshold": round(structure.support_threshold, 6),
            "subgroups": settings.subgroups,
            "uncertain_null": int(settings.uncertain_null),
            # Not a choice of the method, but of how its passes ran (for reproducing them).
            "batch_size": int(settings.batch_size),
            "precision": settings.precision,
        },
        "prototypes": [
            {
                "id": prototype_id(p),
                "active_rate_by_class": {
                    c: round(float(structure.active_rate_by_class[p, i]), 6)
                    for i, c in enumerate(classes)
                },
                "active_rate": round(float(active[:, p].mean()), 6),
                "presence_rate": round(float(presence[:, p].mean()), 6),
                "top_samples": top_samples[p],
            }
            for p in range(k_final)
        ],
        **structure.to_json(),
        "uncertain_by_chance": None if by_chance is None else by_chance.to_json(),
        "patterns": {
            "groups_per_transition": [int(g) for g in patterns.n_groups_per_transition],
            "noise_fraction": [round(float(f), 6) for f in patterns.noise_fraction],
            "all_noise_transitions": [int(t) for t in patterns.all_noise_transitions],
            "groups_per_class": {classes[int(c)]: int(g) for c, g in
                                 zip(patterns.classes, patterns.n_groups_per_class, strict=True)},
            "all_noise_classes": [classes[int(c)] for c, f in
                                  zip(patterns.classes, patterns.class_all_noise, strict=True)
                                  if f],
            "min_cluster_size": int(patterns.min_cluster_size),
        },
        "learning_patterns": [
            g.to_json(list(classes), [int(c.step) for c in ckpts])
            for g in describe_groups(
                patterns.groups, labels, confidence, intensity=intensity,
                z_threshold=settings.structure.z_threshold,
                fits={(f.t, f.group): (f.fit.beta, f.fit.z) for f in mapping.group_fits})
        ],
        "mapping": {"lambdas": [float(f"{x:.6g}") for x in mapping.lambdas],
                    "lambda_mode": mapping.lambda_mode,
                    "cv_r2": [None if not np.isfinite(r) else round(float(r), 6)
                              for r in mapping.cv_r2],
                    "standard_errors": mapping.standard_errors,
                    "bootstrap": int(mapping.n_boot) if mapping.standard_errors == "bootstrap"
                    else 0,
                    "group_fits": len(mapping.group_fits),
                    "skipped_groups": len(mapping.skipped_groups)},
        "versions": {"whylook": __version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    # Encoded before any file is touched: a value JSON cannot hold fails here, with the
    # previous analysis still whole. explanation.json marks a complete analysis: the old one
    # goes before its arrays are replaced, so a kill in between never pairs it with them.
    content = json_bytes(explanation)
    (analysis_dir / "explanation.json").unlink(missing_ok=True)
    save_npz(analysis_dir / "arrays.npz", arrays)
    write_bytes(analysis_dir / "explanation.json", content)
    return Explanation(path=analysis_dir, data=explanation, arrays=arrays)


def _checkpoint_name(ckpts: Any, t: int) -> str:
    return f"checkpoint {t} ({ckpts[t].file}, step {ckpts[t].step})"


def _check_finite(ckpts: Any, t: int, saliency: np.ndarray, confidence: np.ndarray) -> None:
    """A cached shard is never NaN when this version writes it; an older one could be."""
    if not (np.isfinite(saliency).all() and np.isfinite(confidence).all()):
        raise WhylookError(
            f"{_checkpoint_name(ckpts, t)}: its cached Grad-CAM holds NaN or infinite values; "
            "delete the run's analysis/cache folder and explain again"
        )


def _checkpoint_model(folder: Any, t: int, device: torch.device,
                      scratch: list[torch.nn.Module]) -> torch.nn.Module:
    """Checkpoint ``t`` loaded into one reused model object.

    Building a model initialises every weight at random only for it to be overwritten:
    4.7 s per checkpoint for resnet50 on the benchmark CPU, against 0.03 s to load the
    weights into a model that already exists.
    """
    if not scratch:
        scratch.append(folder.load_model(t, device=str(device)))
    else:
        scratch[0].load_state_dict(folder.state_dict(t, scratch[0]))
    return scratch[0]


def load_explanation(run: str | Path | Any) -> Explanation:
    """Read the explanation that :func:`explain` wrote into a run folder.

    ``run`` is the folder's path or the :class:`~whylook.run.RunFolder` that ``train`` and
    ``import_checkpoints`` return. The two files are read without the run's lock (readers
    do not block each other), so an ``explain`` that replaces them meanwhile could pair one's
    old content with the other's new: the read is repeated when ``explanation.json`` changed
    during it.

    >>> load_explanation("no/such/run")
    Traceback (most recent call last):
    whylook.errors.WhylookError: run folder no/such/run does not exist
    """
    analysis = require_explained(run).parent
    for _ in range(_READ_ATTEMPTS):
        before = _identity(analysis / "explanation.json")
        explanation = _read_explanation(analysis)
        if _identity(analysis / "explanation.json") == before:
            return explanation
    raise WhylookError(
        f"the explanation in {analysis} kept changing while it was read (an explain of the "
        "run is running); try again when it has finished"
    )


def require_explained(run: str | Path | Any) -> Path:
    """The path of the run's ``explanation.json``, or a one-line error saying what is
    missing: the run folder, or its explanation (run ``whylook explain`` first)."""
    from whylook._io import require_run_folder

    path = require_run_folder(run)
    if not (path / "analysis" / "explanation.json").is_file():
        raise WhylookError(f"run {path} has no explanation yet; run `whylook explain {path}` first")
    return path / "analysis" / "explanation.json"


#: How often load_explanation reads again an explanation that changed while it was read.
_READ_ATTEMPTS = 3


def _identity(path: Path) -> tuple[int, int, int] | None:
    # explain replaces files by renaming a new one into place: a new inode (or none, while
    # explanation.json is away between the old and the new analysis).
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_explanation(analysis: Path) -> Explanation:
    data = read_json(analysis / "explanation.json", what="explanation")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise WhylookError(
            f"{analysis / 'explanation.json'} is not a whylook explanation; rerun "
            "`whylook explain`"
        )
    try:
        with np.load(analysis / "arrays.npz", allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise WhylookError(
            f"{analysis / 'arrays.npz'} is missing or corrupt ({exc.__class__.__name__}); "
            "rerun `whylook explain`"
        ) from None
    problem = _malformed(data, arrays)
    if problem:
        raise WhylookError(
            f"{analysis} is inconsistent ({problem}); rerun `whylook explain {analysis.parent}`"
        )
    return Explanation(path=analysis, data=data, arrays=arrays)


def _malformed(data: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
    """What is wrong with a read explanation where compare and finetune read it (a file
    edited by hand, or damaged), or ``None``; the report checks its own reads."""
    for key, kind in (("classes", list), ("checkpoints", list), ("prototypes", list),
                      ("classes_explained", list), ("learning_order", list),
                      ("uncertain_prototypes", list), ("grid", list), ("run", dict),
                      ("learning_order_correlation", dict), ("layer", str)):
        if not isinstance(data.get(key), kind):
            return f"explanation.json has no {kind.__name__} {key!r}"
    settings = data.get("structure_settings", {})
    if not (isinstance(settings, dict) and isinstance(
            settings.get("active_threshold", 0.0), int | float)):
        return "explanation.json's structure_settings are malformed"
    if not all(isinstance(c, dict) and "class" in c and isinstance(c.get("shared"), list)
               for c in data["classes_explained"]):
        return "a classes_explained entry is malformed"
    if not all(isinstance(e, dict) and isinstance(e.get("pair"), list) and len(e["pair"]) == 2
               and (e.get("separated_at_checkpoint") is None
                    or isinstance(e["separated_at_checkpoint"], int))
               for e in data["learning_order"]):
        return "a learning_order entry is malformed"
    if not all(isinstance(u, dict) and isinstance(u.get("id"), str)
               and isinstance(u.get("classes"), list) and len(u["classes"]) == 2
               for u in data["uncertain_prototypes"]):
        return "an uncertain_prototypes entry is malformed"
    missing = [n for n in ("sample_index", "labels", "assignments", "beta", "active")
               if n not in arrays]
    if missing:
        return f"arrays.npz lacks {', '.join(missing)}"
    return None
