"""Step 4: learning patterns — HDBSCAN over confidence changes.

``dY^t_i = Y^{t+1}_i - Y^t_i`` is how sample ``i``'s softmax confidences moved between
checkpoints ``t`` and ``t+1``.

* Per transition ``t``: HDBSCAN over ``{dY^t_i}`` of all samples gives the group labels
  ``groups[t, i]`` (``-1`` is noise).
* Per class: HDBSCAN over the class's whole trajectories ``[dY^0_i, ..., dY^{T-1}_i]``
  (concatenated) gives its sub-groups ``class_groups[i]``, numbered within the class
  (``-1`` is noise). These are the intra-class variants of Step 6.

Defaults (our choice, recorded in :class:`Patterns`):

* ``min_cluster_size = max(15, round(0.02 n))`` per transition: a pattern must cover 2% of
  the analysis set (40 of 2000 samples), so with 10 classes a class-wide movement is
  always big enough to be a group, and tiny coincidences are noise. The floor of 15 is
  measured: on uniform noise in 10-d (20 seeds), HDBSCAN reports spurious clusters in
  7/20 runs with min_cluster_size 8 at n=400, 2/20 with 10, 0/20 with 15.
* ``max(15, round(0.10 n_c))`` within a class of ``n_c`` samples: a variant must be a
  tenth of its class.
* ``allow_single_cluster=False`` (scikit-learn's default). With ``True``, HDBSCAN on
  structureless data (uniform noise, or one Gaussian blob of changes) tends to report a
  small dense core as a "pattern" (10 of 500 points on a 10-d Gaussian), which the ridge
  and Step 6 would then read as a group; with ``False`` such a transition comes out all
  noise and is flagged, while planted multi-group structure is found either way.

Group labels are renumbered by size (0 = largest). HDBSCAN is deterministic; no seed.
A transition (or class) where every sample is noise is not an error: it is listed in
``all_noise_transitions`` (or flagged in ``class_all_noise``). A class with fewer samples
than its minimum cluster size is all noise and flagged in ``class_too_small``.

This stage needs all samples at once (clustering is global); it is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from whylook._checks import is_whole
from whylook._parallel import check_n_jobs, thread_map
from whylook.errors import WhylookError
from whylook.intensity import _as_array
from whylook.structure import prototype_id

__all__ = [
    "STEADY_CHANGE",
    "GroupSummary",
    "Patterns",
    "cluster",
    "default_min_cluster_size",
    "describe_groups",
    "find_patterns",
    "is_steady",
    "neighbour_search",
]


#: HDBSCAN's neighbour search: scikit-learn's default k-d tree prunes less and less as the
#: dimension grows, so from ``BRUTE_MIN_DIM`` dimensions on, up to ``BRUTE_MAX_ROWS`` rows,
#: ``cluster`` asks for the brute-force search (one dense distance matrix: about 260 MB
#: at 4096 rows). Both find the same exact core distances and tree. Measured on one thread
#: (benchmarks/RESULTS.md, "HDBSCAN in many dimensions"): a 100-class model's transitions
#: (2000 x 100) 0.14 s against 0.94 s each; the class trajectories of the analysis
#: benchmark (ten of ~200 x 142) 0.06 s against 0.17 s; at 4096 x 24, 0.88 s against
#: 1.13 s; below 24 dimensions, or at 8192 rows in 24, the tree is as fast or faster.
BRUTE_MIN_DIM = 24
BRUTE_MAX_ROWS = 4096
#: From ``BRUTE_WIDE_DIM`` dimensions on, the tree is slower at every size measured (8192
#: rows: 9.6 s against 6.5 s in 100 dimensions, 80 s against 8.5 s in 1000, where 11
#: transitions took a quarter of an hour), so brute force is used there for as many rows
#: as its matrices allow (``BRUTE_MAX_BYTES``: up to 11,585 rows).
BRUTE_WIDE_DIM = 100
#: The memory brute-force fits may hold at once: a fit holds about two float64 n x n
#: matrices (``brute_bytes``; measured 1.0 GB at 8192 rows, 1.8 GB at 12,000), and
#: ``find_patterns`` runs fewer fits at once where ``n_jobs`` of them would hold more.
BRUTE_MAX_BYTES = 2 << 30


def brute_bytes(n: int) -> int:
    """Memory of one brute-force HDBSCAN fit over ``n`` rows: two float64 ``n x n``."""
    return 16 * n * n


def neighbour_search(n: int, d: int) -> str:
    """HDBSCAN's ``algorithm`` for ``n`` rows of ``d`` dimensions (see ``BRUTE_MIN_DIM``).

    >>> neighbour_search(2000, 10), neighbour_search(2000, 100), neighbour_search(9000, 100)
    ('auto', 'brute', 'brute')
    >>> neighbour_search(9000, 50), neighbour_search(20000, 1000)
    ('auto', 'auto')
    """
    if d < BRUTE_MIN_DIM:
        return "auto"
    if n <= BRUTE_MAX_ROWS or (d >= BRUTE_WIDE_DIM and brute_bytes(n) <= BRUTE_MAX_BYTES):
        return "brute"
    return "auto"


def _fits_at_once(shapes: list[tuple[int, int]], n_jobs: int | None) -> int:
    """Workers for fits of these ``(n, d)`` shapes: ``n_jobs``, fewer where brute-force fits
    running side by side would hold more than ``BRUTE_MAX_BYTES`` (never fewer than one)."""
    workers = check_n_jobs(n_jobs)
    held = max((brute_bytes(n) for n, d in shapes if neighbour_search(n, d) == "brute"),
               default=0)
    return max(1, min(workers, BRUTE_MAX_BYTES // held)) if held else workers


def default_min_cluster_size(n: int, fraction: float = 0.02, floor: int = 15) -> int:
    """``max(floor, round(fraction * n))``: the default smallest pattern (module notes).

    >>> default_min_cluster_size(2000), default_min_cluster_size(100)
    (40, 15)
    """
    return max(floor, round(fraction * n))


@dataclass(frozen=True, eq=False)
class Patterns:
    """Learning patterns of Step 4.

    Attributes:
        groups: ``int16 (T, n)``, HDBSCAN group of each sample per transition (-1 noise).
        class_groups: ``int16 (n,)``, sub-group of each sample within its class (-1 noise).
        n_groups_per_transition: ``int64 (T,)``.
        noise_fraction: ``float64 (T,)``, share of samples labelled noise per transition.
        all_noise_transitions: transitions where every sample is noise.
        classes: ``int64 (C,)``, the class labels present, sorted.
        n_groups_per_class: ``int64 (C,)``.
        class_all_noise: ``bool (C,)``, every sample of the class is noise.
        class_too_small: ``bool (C,)``, too few samples to cluster at all.
        min_cluster_size: used per transition.
        class_min_cluster_size: ``int64 (C,)``, used per class.
        min_samples: HDBSCAN's ``min_samples`` (``None``: equal to the cluster size).
        allow_single_cluster: HDBSCAN's flag, as used.
    """

    groups: np.ndarray
    class_groups: np.ndarray
    n_groups_per_transition: np.ndarray
    noise_fraction: np.ndarray
    all_noise_transitions: tuple[int, ...]
    classes: np.ndarray
    n_groups_per_class: np.ndarray
    class_all_noise: np.ndarray
    class_too_small: np.ndarray
    min_cluster_size: int
    class_min_cluster_size: np.ndarray
    min_samples: int | None = None
    allow_single_cluster: bool = False

    def summary(self) -> str:
        """One line for logs and the CLI."""
        noisy = (
            f", all noise at transitions {list(self.all_noise_transitions)}"
            if self.all_noise_transitions
            else ""
        )
        return (
            f"{int(self.n_groups_per_transition.sum())} groups over "
            f"{self.groups.shape[0]} transitions (min_cluster_size={self.min_cluster_size})"
            f"{noisy}; {int(self.n_groups_per_class.sum())} class sub-groups over "
            f"{len(self.classes)} classes"
        )


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber cluster labels 0.. by decreasing size (ties: first occurrence); keep -1."""
    out = np.full(labels.shape, -1, dtype=np.int16)
    ids = [g for g in np.unique(labels) if g >= 0]
    if not ids:
        return out
    sizes = np.array([(labels == g).sum() for g in ids])
    first = np.array([np.flatnonzero(labels == g)[0] for g in ids])
    order = np.lexsort((first, -sizes))
    for new, old in enumerate(order):
        out[labels == ids[old]] = new
    return out


def _dim(x: np.ndarray) -> int:
    return int(x.shape[-1]) if x.ndim > 1 else 1


def cluster(
    x: np.ndarray,
    *,
    min_cluster_size: int,
    min_samples: int | None = None,
    allow_single_cluster: bool = False,
) -> np.ndarray:
    """HDBSCAN labels of the rows of ``x`` as ``int16``, numbered by size (-1 noise).

    Returns all noise, without calling HDBSCAN, when there are fewer rows than
    ``max(2, min_cluster_size, min_samples)``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(0, .01, (20, 2)), rng.normal(1, .01, (30, 2))])
    >>> sorted(set(cluster(x, min_cluster_size=5).tolist()))
    [0, 1]
    """
    with _quiet_duplicates():
        return _cluster(x, min_cluster_size=min_cluster_size, min_samples=min_samples,
                        allow_single_cluster=allow_single_cluster)


def _cluster(x: np.ndarray, *, min_cluster_size: int, min_samples: int | None,
             allow_single_cluster: bool) -> np.ndarray:
    # :func:`cluster` without its warning filters: find_patterns sets them once, in its own
    # thread, around the workers that call this (whylook/_parallel.py says why).
    n = x.shape[0]
    if n < max(2, min_cluster_size, min_samples or 0):
        return np.full(n, -1, dtype=np.int16)
    # Here: the report reads this module's descriptions and needs no scikit-learn.
    from sklearn.cluster import HDBSCAN

    hdb = HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        allow_single_cluster=allow_single_cluster,
        algorithm=neighbour_search(n, _dim(x)),
        copy=True,
    )
    return _by_size(hdb.fit_predict(np.ascontiguousarray(x, dtype=np.float64)))


@contextlib.contextmanager
def _quiet_duplicates() -> Iterator[None]:
    # Exact duplicates (e.g. saturated samples whose confidences no longer move) are
    # legitimate here; HDBSCAN handles them but may warn. And scikit-learn's own Parallel
    # (in HDBSCAN's neighbour search) warns that its configuration was not propagated when
    # it reads the process's warning filters while another fit's task has them emptied
    # (see whylook/_parallel.py): the fits do not depend on that configuration.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message=r"`sklearn\.utils\.parallel\.delayed`",
                                category=UserWarning)
        yield


def find_patterns(
    confidence: object,
    labels: object,
    *,
    min_cluster_size: int | None = None,
    class_min_cluster_size: int | None = None,
    min_samples: int | None = None,
    allow_single_cluster: bool = False,
    profile: object | None = None,
    n_jobs: int | None = None,
) -> Patterns:
    """HDBSCAN learning patterns from the confidences ``(T+1, n, M)`` of all checkpoints.

    Args:
        confidence: softmax confidences per checkpoint, ``(T+1, n, M)`` with ``T >= 1``.
        labels: ``(n,)`` true classes.
        min_cluster_size: per transition; default :func:`default_min_cluster_size` of n.
        class_min_cluster_size: within each class; default ``max(15, round(0.1 n_c))``.
        min_samples: HDBSCAN's ``min_samples`` (default: equal to the cluster size).
        allow_single_cluster: let HDBSCAN return a single group (see the module notes).
        profile: optional ``(n, F)`` per-sample features appended to each trajectory for
            the class sub-groups (``explain`` passes the final checkpoint's prototype
            activity, :func:`whylook.intensity.activity` under the explanation's activity
            rule, so variants that look different but are learned at the same time still
            split; see docs/METHOD-NOTES.md).
        n_jobs: threads for the independent HDBSCAN fits (``None``: one, ``-1``: one per
            core), fewer where brute-force fits side by side would hold more than
            ``BRUTE_MAX_BYTES``; the result does not depend on it.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> conf = rng.dirichlet(np.ones(3), size=(4, 60))     # (T+1=4, n=60, M=3)
    >>> pats = find_patterns(conf, rng.integers(0, 3, 60))
    >>> pats.groups.shape, pats.class_groups.shape
    ((3, 60), (60,))
    """
    conf = _as_array(confidence, "confidence")
    if conf.ndim != 3 or conf.shape[0] < 2:
        raise WhylookError(
            f"confidence must have shape (T+1, n, M) with at least 2 checkpoints, got {conf.shape}"
        )
    if conf.dtype.kind not in "fiu" or not np.isfinite(conf).all():
        raise WhylookError("confidence must be finite numbers; check the model's outputs")
    n = conf.shape[1]
    if n == 0:
        raise WhylookError("no samples to find learning patterns in; pass at least one sample")
    y = _as_array(labels, "labels")
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise WhylookError(f"labels must be {n} integers (one per sample), got {y.dtype} {y.shape}")
    for name, value in (
        ("min_cluster_size", min_cluster_size),
        ("class_min_cluster_size", class_min_cluster_size),
        ("min_samples", min_samples),
    ):
        if value is not None and (not is_whole(value) or value < 2):
            raise WhylookError(f"{name} must be an integer >= 2, not {value!r}")

    check_n_jobs(n_jobs)

    extra = None
    if profile is not None:
        extra = _as_array(profile, "profile").astype(np.float64)
        if extra.ndim != 2 or extra.shape[0] != n or not np.isfinite(extra).all():
            raise WhylookError(
                f"profile must be finite numbers of shape ({n}, F), got {extra.shape}"
            )
    t_count, m = conf.shape[0] - 1, conf.shape[2]
    mcs = int(min_cluster_size or default_min_cluster_size(n))
    opts: dict[str, Any] = {
        "min_samples": min_samples, "allow_single_cluster": allow_single_cluster}

    classes = np.unique(y).astype(np.int64)
    class_mcs = np.zeros(len(classes), np.int64)
    too_small = np.zeros(len(classes), bool)
    members = [np.flatnonzero(y == c) for c in classes]
    # One HDBSCAN per transition, then one per class over its samples' trajectories. Each
    # fit's input (confidence changes in float64) is made when the fit runs: made all at
    # once, for 4000 samples of a 1000-class model, they raised the stage's peak memory
    # by 0.8 GB (825 MB against 189 MB now) and took 2 of its 7.4 s.
    def changes(t: int) -> np.ndarray:
        return np.subtract(conf[t + 1], conf[t], dtype=np.float64)

    def trajectories(rows: np.ndarray) -> np.ndarray:
        part = np.diff(conf[:, rows].astype(np.float64), axis=0)  # (T, n_c, M)
        flat = part.transpose(1, 0, 2).reshape(rows.size, -1)
        return flat if extra is None else np.hstack([flat, extra[rows]])

    jobs: list[tuple[Callable[[], np.ndarray], tuple[int, int], int]] = [
        (functools.partial(changes, t), (n, m), mcs) for t in range(t_count)]
    for c_idx, rows in enumerate(members):
        size = int(class_min_cluster_size or default_min_cluster_size(rows.size, 0.10))
        class_mcs[c_idx] = size
        too_small[c_idx] = rows.size < max(2, size, min_samples or 0)
        width = t_count * m + (0 if extra is None else extra.shape[1])
        jobs.append((functools.partial(trajectories, rows), (rows.size, width), size))
    workers = _fits_at_once([shape for _, shape, _ in jobs], n_jobs)
    # Set in this thread, before the workers copy the filters (see thread_map).
    with _quiet_duplicates():
        labels_of = thread_map(
            lambda job: _cluster(job[0](), min_cluster_size=job[2], **opts), jobs, workers)

    groups = np.stack(labels_of[:t_count])
    n_groups = groups.max(axis=1).astype(np.int64) + 1
    noise = (groups < 0).mean(axis=1)
    class_groups = np.full(n, -1, dtype=np.int16)
    for rows, found in zip(members, labels_of[t_count:], strict=True):
        class_groups[rows] = found
    n_class_groups = np.array([int(found.max()) + 1 for found in labels_of[t_count:]],
                              dtype=np.int64)
    return Patterns(
        groups=groups.astype(np.int16),
        class_groups=class_groups,
        n_groups_per_transition=n_groups,
        noise_fraction=noise.astype(np.float64),
        all_noise_transitions=tuple(int(t) for t in np.flatnonzero(n_groups == 0)),
        classes=classes,
        n_groups_per_class=n_class_groups,
        class_all_noise=n_class_groups == 0,
        class_too_small=too_small,
        min_cluster_size=mcs,
        class_min_cluster_size=class_mcs,
        min_samples=None if min_samples is None else int(min_samples),
        allow_single_cluster=bool(allow_single_cluster),
    )


# --------------------------------------------------------------------------- describing them

GroupFits = dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
#: A learning pattern whose mean confidence change stays below this for every class is
#: steady (``GroupSummary.steady``): one percentage point of confidence.
STEADY_CHANGE = 0.01


def is_steady(gained: float, lost: float, min_change: float = STEADY_CHANGE) -> bool:
    """Whether a group whose largest mean confidence gain is ``gained`` and largest loss
    ``lost`` (negative) is steady: no class moved by ``min_change``.

    >>> is_steady(0.004, -0.002), is_steady(0.004, -0.02)
    (True, False)
    """
    return bool(max(gained, -lost) < min_change)


@dataclass(frozen=True)
class GroupSummary:
    """One learning pattern: HDBSCAN group ``group`` of transition ``transition``.

    Attributes:
        transition, group, size: where it is and how many samples it holds.
        made_of: ``((class, share), ...)``: the classes of its samples, most common first.
        gained, lost: ``(class, change)``: the class whose confidence rose most (fell
            most) on average over its samples, and that mean change.
        drivers: ``((prototype, z), ...)``: from the group's own ridge fit, the prototypes
            whose extra attention raised the confidence in ``gained`` at a z of
            at least the threshold (β > 0), strongest first, among those whose intensity
            changed in enough of the group's samples (see :func:`describe_groups`);
            ``None`` when the group has no fit of its own (smaller than the mapping's
            minimum group size); empty for a steady group.
        steady: no class's mean confidence moved by ``min_change`` or more (late in
            training most samples are saturated and their group still has a largest
            gain, of +0.001); ``gained`` and ``lost`` are then only rounding-sized.
    """

    transition: int
    group: int
    size: int
    made_of: tuple[tuple[int, float], ...]
    gained: tuple[int, float]
    lost: tuple[int, float]
    drivers: tuple[tuple[int, float], ...] | None
    steady: bool = False

    def to_json(self, classes: list[str], steps: list[int]) -> dict[str, object]:
        """The entry of ``explanation.json``'s ``learning_patterns`` (class names, the
        transition's checkpoint steps, prototype ids)."""
        return {
            "transition": self.transition,
            "steps": [int(steps[self.transition]), int(steps[self.transition + 1])],
            "group": self.group,
            "size": self.size,
            # A list, not an object: JSON is written with sorted keys, and the order
            # (most common class first) is part of the answer.
            "made_of": [{"class": classes[c], "share": round(share, 6)}
                        for c, share in self.made_of],
            "gained_most": {"class": classes[self.gained[0]], "change": round(self.gained[1], 6)},
            "lost_most": {"class": classes[self.lost[0]], "change": round(self.lost[1], 6)},
            "steady": self.steady,
            "prototypes": None if self.drivers is None else [
                {"id": prototype_id(k), "z": round(z, 3)} for k, z in self.drivers],
        }


def describe_groups(
    groups: object,
    labels: object,
    confidence: object,
    *,
    fits: GroupFits | None = None,
    intensity: object | None = None,
    z_threshold: float = 2.0,
    min_changed: float = 0.1,
    min_change: float = STEADY_CHANGE,
    top: int = 3,
) -> tuple[GroupSummary, ...]:
    """What each learning pattern is: its make-up, the class it gained most and lost most
    in, and (with ``fits``) the prototypes its own ridge fit credits with the gain.

    Args:
        groups: ``(T, n)`` HDBSCAN labels (``Patterns.groups``; -1 is noise).
        labels: ``(n,)`` true classes; confidence: ``(T+1, n, M)``.
        fits: ``{(t, group): (beta (K, M), z (K, M))}``, e.g. from
            :meth:`whylook.mapping.Mapping.group_arrays`; ``None``: no drivers.
        intensity: ``(T+1, n, K)`` prototype intensities. A driver's intensity must change
            in at least ``min_changed`` of the group's samples (and in 5): a coefficient
            that one sample carries gets a bootstrap z of about 2.07 whatever its size
            (the resamples either hold that sample or not), two samples about 2.9, so
            with bootstrap standard errors the z alone cannot tell it from signal (the
            default jackknife puts it near 1; the condition guards either way). Samples
            whose Grad-CAM map is blank at both ends (Step 6's "learning unseen") change
            no intensity at all.
        z_threshold: the z a driver needs; top: classes and drivers listed.
        min_change: a group whose mean confidence change stays below this for every
            class is ``steady``: it gained nothing worth a driver.

    >>> import numpy as np
    >>> conf = np.array([[[0.5, 0.5]] * 4, [[0.9, 0.1]] * 2 + [[0.5, 0.5]] * 2])
    >>> one = describe_groups(np.array([[0, 0, -1, -1]]), np.array([0, 1, 0, 1]), conf)[0]
    >>> one.size, one.made_of, one.gained, one.drivers
    (2, ((0, 0.5), (1, 0.5)), (0, 0.4), None)
    """
    g_arr, y = _as_array(groups, "groups"), _as_array(labels, "labels")
    conf = _as_array(confidence, "confidence").astype(np.float64)
    shapes_fit = (conf.ndim == 3 and g_arr.shape == (conf.shape[0] - 1, conf.shape[1])
                  and y.shape == (conf.shape[1],))
    if not shapes_fit:
        raise WhylookError(
            f"groups must be (T, n), labels (n,) and confidence (T+1, n, M); got "
            f"{g_arr.shape}, {y.shape} and {conf.shape}"
        )
    m = conf.shape[2]
    moved = None
    if intensity is not None:
        inten = _as_array(intensity, "intensity")
        if inten.ndim != 3 or inten.shape[:2] != conf.shape[:2]:
            raise WhylookError(f"intensity must be (T+1, n, K), got {inten.shape}")
        moved = np.diff(inten, axis=0) != 0  # (T, n, K)
    out = []
    for t in range(g_arr.shape[0]):
        change = conf[t + 1] - conf[t]
        for g in np.unique(g_arr[t]):
            if g < 0:
                continue
            rows = g_arr[t] == g
            mean = change[rows].mean(axis=0)
            gain, loss = int(np.argmax(mean)), int(np.argmin(mean))
            counts = np.bincount(y[rows], minlength=m)
            made_of = tuple((int(c), float(counts[c] / rows.sum()))
                            for c in np.argsort(-counts, kind="stable")[:top] if counts[c])
            fit = None if fits is None else fits.get((t, int(g)))
            steady = is_steady(float(mean[gain]), float(mean[loss]), min_change)
            drivers: tuple[tuple[int, float], ...] | None = None
            if fit is not None and steady:
                drivers = ()
            elif fit is not None:
                beta, z = fit
                enough = (np.ones(z.shape[0], bool) if moved is None else
                          moved[t][rows].sum(axis=0) >= max(5, min_changed * rows.sum()))
                drivers = tuple((int(k), float(z[k, gain]))
                                for k in np.argsort(-z[:, gain], kind="stable")
                                if z[k, gain] >= z_threshold and beta[k, gain] > 0
                                and enough[k])[:top]
            out.append(GroupSummary(t, int(g), int(rows.sum()), made_of,
                                    (gain, float(mean[gain])), (loss, float(mean[loss])),
                                    drivers, steady))
    return tuple(out)
