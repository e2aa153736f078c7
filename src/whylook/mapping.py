"""Step 5: prototype -> confidence mapping (ridge), with jackknife or bootstrap z-scores.

For each transition ``t`` the rows of ``pi`` are the intensity changes ``dP^t_i`` (n x K)
and the rows of ``C`` the confidence changes ``dY^t_i`` (n x M):

    beta^t = (pi^T pi + lambda I)^{-1} pi^T C          (K x M, no intercept)

``beta^t[k, c] > 0`` reads "at step t, more attention to prototype k raised the confidence
in class c".

* lambda is fixed (``lam=<float>``, absolute) or chosen by exact leave-one-out
  cross-validation (``lam="cv"``, the default). LOO is computed for the whole grid from one
  thin SVD ``pi = U S V^T`` (the hat matrix is ``U diag(s^2/(s^2+lambda)) U^T``), the same
  criterion as ``sklearn.linear_model.RidgeCV(fit_intercept=False)``. The grid is relative,
  ``lambda = a * ||pi||_F^2 / K`` for ``a`` in ``alphas``, because raw Grad-CAM scales differ
  by orders of magnitude between checkpoints; the absolute lambda is recorded. Ties go to
  the larger lambda.
* Signal vs noise: a standard error for every coefficient and ``z = beta / se``.
  ``standard_errors="jackknife"`` (the default) is the delete-one jackknife of the ridge
  solution at the chosen lambda, in closed form: leaving sample ``i`` out moves beta by
  ``-(pi^T pi + lambda I)^{-1} pi_i e_i / (1 - h_i)``, with ``e_i`` its residual and
  ``h_i`` its leverage, so every refit comes from the one SVD, with no resampling
  noise and no seed. It is in essence the heteroskedasticity-consistent "HC3"
  estimator, the one recommended for samples this small (a class's ~200 samples against
  K = 32 prototypes), and it keeps a coefficient that one sample carries at ``|z|`` about
  1. In the class fits it is the more cautious of the two (docs/METHOD-NOTES.md, Step 5).
  ``"bootstrap"`` draws ``n_boot`` resamples of the samples (seeded per transition and
  group), each solved in closed form with the chosen lambda; all resamples are solved at
  once, the weighted Gram matrices ``sum_i w_bi pi_i pi_i^T`` of every resample coming from
  one matrix product of the resampling counts with the per-sample outer products.
  On real runs the two agree to within the bootstrap's own noise over the global fits
  (docs/METHOD-NOTES.md, Step 5); with the jackknife, Step 5 runs 4.4x faster
  (``benchmarks/bench_mapping.py``).
* ``lead_errors``: the standard error of the accumulated lead ``sum_{s<=t} (beta^s[k, a] -
  beta^s[k, b])`` that Step 6 reads for uncertain prototypes, from the same jackknife
  (each sample left out of every transition at once) or bootstrap, so that it counts
  how the two classes' coefficients co-vary; computed when asked, for the pairs Step 6
  tests (:class:`LeadErrors`).
* The same fit runs on each HDBSCAN group of each transition with at least
  ``min_group_size`` samples; smaller groups are skipped and listed.

The fit needs all samples of a transition at once; transitions are independent, so work
can be split by transition (:func:`ridge_fit` on one transition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from whylook._checks import is_number, is_whole
from whylook._parallel import check_n_jobs, thread_map
from whylook.errors import WhylookError
from whylook.intensity import _as_array

__all__ = [
    "DEFAULT_ALPHAS",
    "STANDARD_ERRORS",
    "ClassMapping",
    "GroupFit",
    "LeadErrors",
    "Mapping",
    "RidgeFit",
    "fit_class_mapping",
    "fit_mapping",
    "ridge_fit",
]

#: Relative ridge grid: lambda = alpha * ||pi||_F^2 / K (the mean eigenvalue of pi^T pi).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-4, 4, 33))
#: How standard errors are estimated: closed-form jackknife (the default), bootstrap, or not.
STANDARD_ERRORS: tuple[str, ...] = ("jackknife", "bootstrap", "none")
StandardErrors = Literal["jackknife", "bootstrap", "none"]
_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True, eq=False)
class RidgeFit:
    """One ridge fit with its standard errors.

    Attributes:
        beta: ``float64 (K, M)``.
        beta_se: ``float64 (K, M)`` jackknife or bootstrap standard errors (NaN without).
        z: ``float64 (K, M)``, ``beta / se``; 0 where ``se`` is 0 (e.g. a prototype whose
            intensity never changes), NaN without standard errors.
        lam: the absolute lambda used.
        cv_r2: leave-one-out R^2 at ``lam`` against predicting no change,
            ``1 - SSE_loo / sum C^2`` (NaN for a fixed lambda).
        n: samples fitted.
    """

    beta: np.ndarray
    beta_se: np.ndarray
    z: np.ndarray
    lam: float
    cv_r2: float
    n: int


@dataclass(frozen=True, eq=False)
class GroupFit:
    """Ridge fit of one HDBSCAN group ``group`` of transition ``t`` (see :class:`RidgeFit`)."""

    t: int
    group: int
    fit: RidgeFit


@dataclass(frozen=True, eq=False)
class Mapping:
    """Step 5 result.

    Attributes:
        beta, beta_se, z: ``float32 (T, K, M)``.
        lambdas: ``float64 (T,)`` absolute lambda per transition.
        cv_r2: ``float64 (T,)`` leave-one-out R^2 per transition (NaN for a fixed lambda).
        lambda_mode: ``"cv"`` or ``"fixed"``.
        alphas: the relative grid searched (empty for a fixed lambda).
        n_boot, seed: the bootstrap settings (unused by the jackknife).
        group_fits: fits of the HDBSCAN groups, ordered by (t, group).
        skipped_groups: ``(t, group, size)`` of groups smaller than ``min_group_size``.
        min_group_size: the threshold used.
        standard_errors: ``"jackknife"``, ``"bootstrap"`` or ``"none"``.
        lead_errors: the standard errors of the accumulated leads ``sum_{s<=t}
            (beta^s[k, a] - beta^s[k, b])`` that Step 6 reads for uncertain prototypes,
            computed for the pairs asked for (:class:`LeadErrors`; ``None`` without
            standard errors).
    """

    beta: np.ndarray
    beta_se: np.ndarray
    z: np.ndarray
    lambdas: np.ndarray
    cv_r2: np.ndarray
    lambda_mode: str
    alphas: np.ndarray
    n_boot: int
    seed: int
    group_fits: tuple[GroupFit, ...]
    skipped_groups: tuple[tuple[int, int, int], ...]
    min_group_size: int
    standard_errors: str = "jackknife"
    lead_errors: LeadErrors | None = None

    @functools.cached_property
    def lead_se(self) -> np.ndarray | None:
        """``float32 (T, K, M, M)``: ``lead_se[t, k, a, b]`` the standard error of the lead
        of ``a`` over ``b`` (``None`` without standard errors); all of
        :attr:`lead_errors` at once, ``4 T K M^2`` bytes."""
        return None if self.lead_errors is None else self.lead_errors.dense()

    @property
    def group_betas(self) -> dict[tuple[int, int], np.ndarray]:
        """``{(t, group): beta (K, M)}`` for every fitted group."""
        return {(g.t, g.group): g.fit.beta for g in self.group_fits}

    def group_fit(self, t: int, group: int) -> RidgeFit:
        """The fit of one group; :class:`WhylookError` if it was skipped or does not exist."""
        for g in self.group_fits:
            if (g.t, g.group) == (t, group):
                return g.fit
        raise WhylookError(f"no ridge fit for group {group} of transition {t} (skipped or absent)")

    def group_arrays(self) -> dict[str, np.ndarray]:
        """The group fits as the arrays ``explain`` stores, one row per fitted group:

        ``beta_group``, ``beta_group_se``, ``beta_group_z``: ``float32 (G, K, M)``;
        ``beta_group_key``: ``int64 (G, 3)``, each row ``(transition, group, samples)``;
        ``beta_group_lambda``: ``float64 (G,)``. ``G`` may be 0 (every transition all noise).

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> dp = rng.normal(size=(2, 60, 3))
        >>> groups = np.tile(np.repeat([0, 1, -1], 20), (2, 1))  # 2 transitions, 60 samples
        >>> arrays = fit_mapping(dp, dp @ np.eye(3, 2), groups=groups, n_boot=10).group_arrays()
        >>> arrays["beta_group"].shape, arrays["beta_group_key"].tolist()
        ((4, 3, 2), [[0, 0, 20], [0, 1, 20], [1, 0, 20], [1, 1, 20]])
        """
        k, m = self.beta.shape[1:]
        fits = [g.fit for g in self.group_fits]

        def stack(name: str) -> np.ndarray:
            if not fits:
                return np.zeros((0, k, m), np.float32)
            return np.stack([getattr(f, name) for f in fits]).astype(np.float32)

        return {
            "beta_group": stack("beta"),
            "beta_group_se": stack("beta_se"),
            "beta_group_z": stack("z"),
            "beta_group_key": np.array(
                [(g.t, g.group, g.fit.n) for g in self.group_fits], np.int64
            ).reshape(-1, 3),
            "beta_group_lambda": np.array([f.lam for f in fits], np.float64),
        }


# --------------------------------------------------------------------------- one transition


def _shrink(s: np.ndarray, lam: float) -> np.ndarray:
    """``s / (s^2 + lam)``, with 0 where both vanish (the pseudo-inverse at lam = 0)."""
    denom = s**2 + lam
    return np.divide(s, denom, out=np.zeros_like(s), where=denom > 0)


def _loo_sse(u: np.ndarray, s: np.ndarray, c: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """Leave-one-out sum of squared errors of ridge for each lambda in ``lams``."""
    s2 = s**2
    denom = s2 + lams[:, None]  # (L, r)
    f = np.divide(s2, denom, out=np.zeros_like(denom), where=denom > 0)
    loo = 1.0 - f @ (u**2).T  # (L, n): one minus the hat matrix's diagonal per lambda
    utc = u.T @ c
    if c.shape[1] > u.shape[1]:
        sse = _loo_sse_gram(u, c, f, loo, utc)
    else:
        sse = _loo_sse_residuals(u, c, f, loo, utc)
    # h -> 1 only without shrinkage on a sample that alone fixes a direction; its LOO
    # error is unbounded, so that lambda cannot win.
    sse[(loo <= 1e-12).any(axis=1)] = np.inf
    return sse


def _loo_sse_residuals(
    u: np.ndarray, c: np.ndarray, f: np.ndarray, loo: np.ndarray, utc: np.ndarray
) -> np.ndarray:
    """:func:`_loo_sse` from every lambda's ``(n, M)`` residuals (for M up to the rank)."""
    sse = np.empty(f.shape[0])
    # Several lambdas per matrix product, but residuals of at most ~32 MB at a time (many
    # classes or samples would make all of them at once gigabytes).
    step = max(1, _CHUNK_BYTES // (8 * c.size))
    for lo in range(0, f.shape[0], step):
        resid = c - u @ (f[lo:lo + step, :, None] * utc)  # (step, n, M)
        with np.errstate(divide="ignore", invalid="ignore"):
            sse[lo:lo + step] = ((resid / loo[lo:lo + step, :, None]) ** 2).sum(axis=(1, 2))
    return sse


def _loo_sse_gram(
    u: np.ndarray, c: np.ndarray, f: np.ndarray, loo: np.ndarray, utc: np.ndarray
) -> np.ndarray:
    """:func:`_loo_sse` without the residuals, for more outputs M than the rank r.

    With ``c = u w + p`` (``w = u^T c``, ``p`` the part of ``c`` outside u's columns) and
    ``g = 1 - f``, sample i's residual is ``p_i + (u_i * g) w``, so its squared norm is
    ``|p_i|^2 + 2 (u_i * g) . (w p_i^T) + (u_i * g) (w w^T) (u_i * g)^T``: per lambda
    ``n r^2`` operations against the residuals' ``n r M``. A thousand classes made those
    residuals 4000 x 1000 per lambda, 0.9 s a fit against 0.06 s this way. Splitting off
    ``p`` first keeps the terms of the residual's size, so nothing cancels: the two forms
    agree to a few ulps (tests/test_mapping.py).
    """
    perp = c - u @ utc  # (n, M)
    outside = np.einsum("nm,nm->n", perp, perp)
    cross = u * (perp @ utc.T)  # (n, r): u_i * (w p_i^T)
    gram = utc @ utc.T  # (r, r)
    sse = np.empty(f.shape[0])
    for i, keep in enumerate(1.0 - f):
        ug = u * keep
        inside = np.einsum("nr,nr->n", ug @ gram, ug)
        with np.errstate(divide="ignore", invalid="ignore"):
            sse[i] = ((outside + 2.0 * (cross @ keep) + inside) / loo[i] ** 2).sum()
    return sse


@dataclass(frozen=True, eq=False)
class _Influence:
    """How leaving each sample out moves a fit's beta: ``d_i = -q_i e_i^T`` (K x M), except
    on ``extra_rows``, whose ``d_i`` are given whole in ``extra`` (q and e are 0 there)."""

    q: np.ndarray  # (n, K)
    e: np.ndarray  # (n, M)
    extra_rows: np.ndarray  # (f,)
    extra: np.ndarray  # (f, K, M)

    def by_column(self) -> _Influence:
        """The same influences with ``e`` column-major, for :meth:`moves`: gathering the
        columns ``used`` then reads whole columns, a third of the time of picking them out
        of every row (4000 x 1000, 300 columns: 4.3 ms against 14 ms); same values."""
        return dataclasses.replace(self, e=np.asfortranarray(self.e))

    def moves(self, k: int, used: np.ndarray) -> np.ndarray:
        """``(n, u)``: every ``d_i[k, used]``, prototype ``k``'s row at the columns ``used``."""
        d = -(self.q[:, k, None] * self.e[:, used])
        d[self.extra_rows] = self.extra[:, k][:, used]
        return d


def _jackknife(
    x: np.ndarray,
    y: np.ndarray,
    beta: np.ndarray,
    svd: tuple[np.ndarray, np.ndarray, np.ndarray],
    lam: float,
) -> tuple[np.ndarray, _Influence]:
    """``(K, M)`` delete-one jackknife standard errors of ridge at ``lam``, exactly, and the
    influences they come from.

    Without sample ``i`` the solution moves by ``d_i = -q_i e_i`` with ``q_i = A^{-1} pi_i``
    (``A = pi^T pi + lam I``) and ``e_i = r_i / (1 - h_i)``; the jackknife variance
    ``(n-1)/n sum_i (d_i - mean d)^2`` is then two matrix products, never n refits.
    """
    n = x.shape[0]
    u, s, vt = svd
    q = (u * _shrink(s, lam)) @ vt  # row i: A^{-1} pi_i
    s2 = s**2
    fraction = np.divide(s2, s2 + lam, out=np.zeros_like(s2), where=s2 + lam > 0)
    keep = 1.0 - (u**2) @ fraction  # 1 - h_i
    # h_i = 1 only without shrinkage, for a sample that alone fixes a direction: without
    # it the solution is not unique and the update formula divides by zero. Such samples
    # (rare, and only at lam = 0) are refitted explicitly, taking the minimum-norm
    # solution, in which the direction only they fixed gets 0.
    free = keep <= 1e-12
    e = (y - x @ beta) / np.where(free, 1.0, keep)[:, None]
    e[free] = 0.0
    q[free] = 0.0
    sum_sq = (q**2).T @ (e**2)  # sum_i d_i^2
    total = -(q.T @ e)  # sum_i d_i
    extra_rows = np.flatnonzero(free)
    extra = np.zeros((extra_rows.size, *beta.shape))
    for j, i in enumerate(extra_rows):
        rest = np.arange(n) != i
        extra[j] = np.linalg.lstsq(x[rest], y[rest], rcond=None)[0] - beta
    sum_sq += (extra**2).sum(axis=0)
    total += extra.sum(axis=0)
    se = np.sqrt(np.maximum((n - 1) / n * (sum_sq - total**2 / n), 0.0))
    return se, _Influence(q, e, extra_rows, extra)


@dataclass(frozen=True, eq=False)
class LeadErrors:
    """Standard errors of the accumulated leads ``sum_{s<=t} (beta^s[k, a] - beta^s[k, b])``
    that Step 6 reads for uncertain prototypes, computed for the pairs asked for.

    ``beta[k, a]`` and ``beta[k, b]`` come from the same samples, whose confidence gained
    in one class is lost in another, so their errors are correlated (and a sample's errors
    at successive transitions may be); adding the two standard errors in quadrature was
    off by a factor 0.5-1.4 on real runs. The jackknife leaves each sample out of every
    transition at once and takes the variance of the lead itself; the bootstrap, whose
    resamples differ between transitions, gives each transition's ``Var(beta_a - beta_b)``
    from its resamples and adds them up. Step 6 tests only the pairs of classes a
    prototype is active in, so the errors are computed per prototype for those classes:
    all ``(T, K, M, M)`` of them at once (:meth:`dense`) would take gigabytes and minutes
    near a thousand classes.
    """

    parts: tuple[_Influence | np.ndarray, ...]  # per transition: influences or resamples
    standard_errors: str
    shape: tuple[int, int, int]  # (n, K, M)

    def pairs(self, k: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``(T, A)``: the errors of prototype ``k``'s leads of ``a[j]`` over ``b[j]``.

        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(2, 50, 2)), rng.normal(size=(2, 50, 3))
        >>> errors = fit_mapping(x, y).lead_errors
        >>> ab = errors.pairs(1, np.array([0, 2]), np.array([2, 1]))
        >>> bool(np.allclose(ab, errors.dense()[:, 1, [0, 2], [2, 1]]))
        True
        """
        a, b = np.asarray(a, dtype=np.intp), np.asarray(b, dtype=np.intp)
        used, index = np.unique(np.concatenate([a, b]), return_inverse=True)
        var = self._lead_var(k, used)
        ia, ib = index[: a.size], index[a.size:]
        return np.sqrt(np.maximum(var[:, ia, ib], 0.0))

    def dense(self) -> np.ndarray:
        """``float32 (T, K, M, M)``: every prototype's every lead's error."""
        _, k, m = self.shape
        out = np.empty((len(self.parts), k, m, m), np.float32)
        every = np.arange(m)
        for p in range(k):
            out[:, p] = np.sqrt(np.maximum(self._lead_var(p, every), 0.0))
        return out

    def _lead_var(self, k: int, used: np.ndarray) -> np.ndarray:
        """``(T, u, u)``: the variance of the lead of ``used[i]`` over ``used[j]``."""
        n = self.shape[0]
        out = np.empty((len(self.parts), used.size, used.size))
        total = np.zeros((n, used.size) if self.standard_errors == "jackknife"
                         else (used.size, used.size))
        for t, part in enumerate(self.parts):
            if isinstance(part, _Influence):
                # Each sample's move of the lead, summed over the transitions so far.
                total += part.moves(k, used)
                centred = total - total.mean(axis=0)
                cov = (centred.T @ centred) * (n - 1) / n
            else:
                solutions = part[:, k, used]
                centred = solutions - solutions.mean(axis=0)
                total += (centred.T @ centred) / (part.shape[0] - 1)
                cov = total
            var = np.diagonal(cov)
            out[t] = var[:, None] + var[None, :] - 2.0 * cov
        return out


def _bootstrap(
    pi: np.ndarray, c: np.ndarray, lam: float, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """``(n_boot, K, M)`` ridge solutions on resampled rows, all solved at once."""
    n, k = pi.shape
    m = c.shape[1]
    # Resampling counts: n draws with replacement per resample (a multinomial), via one
    # bincount, which is ~20x faster than rng.multinomial over n categories.
    draws = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    weights = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)
    # Only the upper triangle of each Gram matrix is computed (it is symmetric).
    iu, ju = _triu(k)
    gram_u = np.zeros((n_boot, iu.size))
    cross = np.zeros((n_boot, k * m))
    # Chunk the per-sample products so they stay within a fixed memory budget.
    step = max(1, _CHUNK_BYTES // (8 * (iu.size + k * m)))
    for lo in range(0, n, step):
        p = pi[lo : lo + step]
        w = weights[:, lo : lo + step]
        gram_u += w @ _upper_products(p)
        cross += w @ (p[:, :, None] * c[lo : lo + step, None, :]).reshape(p.shape[0], -1)
    gram = np.zeros((n_boot, k, k))
    gram[:, iu, ju] = gram_u
    gram[:, ju, iu] = gram_u
    gram += lam * np.eye(k)
    cross = cross.reshape(n_boot, k, m)
    try:
        return np.linalg.solve(gram, cross)
    except np.linalg.LinAlgError:
        # Only reachable with lam = 0 and a resample that does not span all prototypes.
        return np.linalg.pinv(gram) @ cross


@functools.lru_cache(maxsize=8)
def _triu(k: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.triu_indices(k)``, read-only and computed once per K (~150 fits share it)."""
    iu, ju = np.triu_indices(k)
    iu.flags.writeable = False
    ju.flags.writeable = False
    return iu, ju


def _upper_products(p: np.ndarray) -> np.ndarray:
    """``(rows, k(k+1)/2)`` products ``p[:, i] * p[:, j]`` for ``i <= j`` in
    ``np.triu_indices`` order, bit for bit either way. On many rows, one slice per ``i``
    (2000 x 32: 6 ms against 16 ms for gathering both columns by index, which was a
    quarter of a transition's bootstrap); on few, the gather (200 rows: 0.3 against 0.46
    ms, where the k calls' overhead dominates)."""
    k = p.shape[1]
    if p.shape[0] < 512:
        iu, ju = _triu(k)
        return p[:, iu] * p[:, ju]
    out = np.empty((p.shape[0], k * (k + 1) // 2))
    at = 0
    for i in range(k):
        np.multiply(p[:, i : i + 1], p[:, i:], out=out[:, at : at + k - i])
        at += k - i
    return out


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Run BLAS single-threaded: these are many small dense problems, where threads only
    add synchronisation, and on a busy machine they made fit_mapping 10x slower (22 s
    instead of 2.4 s at T=12, n=2000, K=32 on two shared cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def ridge_fit(
    pi: object,
    c: object,
    *,
    lam: float | Literal["cv"] = "cv",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    standard_errors: StandardErrors = "jackknife",
    n_boot: int = 100,
    seed: int | Sequence[int] = 0,
) -> RidgeFit:
    """Ridge ``beta = (pi^T pi + lam I)^{-1} pi^T C`` without intercept, with standard
    errors and z-scores.

    Args:
        pi: ``(n, K)`` predictors (intensity changes).
        c: ``(n, M)`` targets (confidence changes).
        lam: an absolute lambda >= 0, or ``"cv"`` for leave-one-out over ``alphas``.
        alphas: relative grid, ``lambda = alpha * ||pi||_F^2 / K``.
        standard_errors: ``"jackknife"`` (closed form, exact, no seed), ``"bootstrap"``
            or ``"none"`` (module notes).
        n_boot: bootstrap resamples (0: no standard errors); only for the bootstrap.
        seed: seeds the bootstrap (an int or a sequence of ints for numpy's SeedSequence).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pi = rng.normal(size=(200, 4))
    >>> c = pi @ np.array([[1.0], [0.0], [0.0], [-2.0]]) + rng.normal(0, 0.1, (200, 1))
    >>> fit = ridge_fit(pi, c)
    >>> np.round(fit.beta.ravel(), 1).tolist(), bool(abs(fit.z[0, 0]) > 10)
    ([1.0, 0.0, 0.0, -2.0], True)
    """
    with _one_blas_thread():
        return _ridge_fit(pi, c, lam=lam, alphas=alphas, standard_errors=standard_errors,
                          n_boot=n_boot, seed=seed)


def _ridge_fit(pi: object, c: object, **options: object) -> RidgeFit:
    return _ridge_fit_parts(pi, c, **options)[0]  # type: ignore[arg-type]


def _ridge_fit_parts(
    pi: object,
    c: object,
    *,
    lam: float | Literal["cv"],
    alphas: Sequence[float],
    standard_errors: str,
    n_boot: int,
    seed: int | Sequence[int],
) -> tuple[RidgeFit, _Influence | np.ndarray | None]:
    """The fit, and what its standard errors came from: the jackknife's influences or the
    bootstrap's solutions (``None`` without standard errors)."""
    x = np.asarray(_as_array(pi, "pi"), dtype=np.float64)
    y = np.asarray(_as_array(c, "c"), dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise WhylookError(
            f"pi must be (n, K) and C (n, M) with the same n, got {x.shape} and {y.shape}"
        )
    n, k = x.shape
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise WhylookError("intensity or confidence changes contain NaN or infinite values")
    if not is_whole(n_boot) or n_boot < 0 or n_boot == 1:
        raise WhylookError(f"n_boot must be 0 or an integer >= 2, not {n_boot!r}")
    _check_standard_errors(standard_errors)
    cv = lam == "cv"
    numeric = is_number(lam)
    if not cv and not (numeric and np.isfinite(lam) and float(lam) >= 0):
        raise WhylookError(f"lam must be 'cv' or a number >= 0, not {lam!r}")
    if n < (2 if cv else 1):
        raise WhylookError(f"ridge needs at least {2 if cv else 1} samples, got {n}")

    u, s, vt = np.linalg.svd(x, full_matrices=False)
    scale = float((s**2).sum()) / k
    cv_r2 = float("nan")
    if cv:
        grid = np.asarray(alphas, dtype=np.float64)
        if grid.ndim != 1 or grid.size == 0 or (grid <= 0).any():
            raise WhylookError("alphas must be a non-empty list of positive numbers")
        lams = np.sort(grid) * (scale if scale > 0 else 1.0)
        sse = _loo_sse(u, s, y, lams)
        best = lams.size - 1 - int(np.argmin(sse[::-1]))  # ties -> the larger lambda
        lam_value = float(lams[best])
        total = float((y**2).sum())
        cv_r2 = 1.0 - float(sse[best]) / total if total > 0 and np.isfinite(sse[best]) else 0.0
    else:
        lam_value = float(lam)

    beta = vt.T @ (_shrink(s, lam_value)[:, None] * (u.T @ y))
    if standard_errors == "none" or (standard_errors == "bootstrap" and n_boot == 0):
        nan = np.full_like(beta, np.nan)
        return RidgeFit(beta, nan, nan.copy(), lam_value, cv_r2, n), None
    parts: _Influence | np.ndarray
    if standard_errors == "jackknife":
        se, parts = _jackknife(x, y, beta, (u, s, vt), lam_value)
    else:
        parts = _bootstrap(x, y, lam_value, int(n_boot), np.random.default_rng(seed))
        se = parts.std(axis=0, ddof=1)
    # A prototype whose intensity never changes has beta = se = 0 up to rounding; its z
    # must be 0, not the ratio of two rounding errors.
    tol = 1e-9 * max(float(np.abs(beta).max(initial=0.0)), float(se.max(initial=0.0)), 1e-300)
    z = np.divide(beta, se, out=np.zeros_like(beta), where=se > tol)
    return RidgeFit(beta, se, z, lam_value, cv_r2, n), parts


def _check_standard_errors(value: object) -> None:
    if not (isinstance(value, str) and value in STANDARD_ERRORS):
        raise WhylookError(
            f"standard_errors must be one of {', '.join(map(repr, STANDARD_ERRORS))}, "
            f"not {value!r}"
        )


# --------------------------------------------------------------------------- all transitions


def fit_mapping(
    delta_p: object,
    delta_y: object,
    *,
    groups: object | None = None,
    lam: float | Literal["cv"] = "cv",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    standard_errors: StandardErrors = "jackknife",
    n_boot: int = 100,
    seed: int = 0,
    min_group_size: int = 10,
    n_jobs: int | None = None,
) -> Mapping:
    """Ridge mapping ``beta^t`` for every transition, over all samples and per group.

    Args:
        delta_p: ``(T, n, K)`` intensity changes ``P^{t+1} - P^t``.
        delta_y: ``(T, n, M)`` confidence changes ``Y^{t+1} - Y^t``.
        groups: ``(T, n)`` HDBSCAN labels (``Patterns.groups``); ``None`` skips group fits.
        lam, alphas, standard_errors, n_boot: see :func:`ridge_fit`.
        seed: bootstrap seed; transition ``t`` uses ``[seed, t, 0]``, its group ``g`` uses
            ``[seed, t, g + 1]``, so results do not depend on how work is split.
        min_group_size: groups with fewer samples are skipped and listed.
        n_jobs: threads for the independent fits (``None``: one, ``-1``: one per core);
            the result does not depend on it.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dp = rng.normal(size=(3, 100, 5))
    >>> dy = dp @ rng.normal(size=(5, 4)) + rng.normal(0, 0.1, (3, 100, 4))
    >>> mp = fit_mapping(dp, dy, groups=np.zeros((3, 100), int))
    >>> mp.beta.shape, sorted(mp.group_betas)
    ((3, 5, 4), [(0, 0), (1, 0), (2, 0)])
    """
    dp = _as_array(delta_p, "delta_p")
    dy = _as_array(delta_y, "delta_y")
    if dp.ndim != 3 or dy.ndim != 3 or dp.shape[:2] != dy.shape[:2]:
        raise WhylookError(
            f"delta_p must be (T, n, K) and delta_y (T, n, M) with the same T and n, got "
            f"{dp.shape} and {dy.shape}"
        )
    t_count, n, k = dp.shape
    m = dy.shape[2]
    g_arr = None
    if groups is not None:
        g_arr = _as_array(groups, "groups")
        if g_arr.shape != (t_count, n) or g_arr.dtype.kind not in "iu":
            raise WhylookError(
                f"groups must be integer labels of shape ({t_count}, {n}), got {g_arr.shape}"
            )
    if not is_whole(min_group_size) or min_group_size < 2:
        raise WhylookError(f"min_group_size must be an integer >= 2, not {min_group_size!r}")
    _check_standard_errors(standard_errors)
    check_n_jobs(n_jobs)

    def fit(t: int, rows: np.ndarray | slice, tag: int) -> tuple[RidgeFit, object]:
        return _ridge_fit_parts(dp[t][rows], dy[t][rows], lam=lam, alphas=alphas,
                                standard_errors=standard_errors, n_boot=n_boot,
                                seed=[seed, t, tag])

    # Every transition's fit over all samples, then its groups' fits; all independent.
    jobs: list[tuple[int, np.ndarray | slice, int]] = []
    skipped: list[tuple[int, int, int]] = []
    for t in range(t_count):
        jobs.append((t, slice(None), 0))
        if g_arr is None:
            continue
        for g in np.unique(g_arr[t]):
            if g < 0:
                continue
            rows = np.flatnonzero(g_arr[t] == g)
            if rows.size < min_group_size:
                skipped.append((t, int(g), int(rows.size)))
                continue
            jobs.append((t, rows, int(g) + 1))
    with _one_blas_thread():
        fits = thread_map(lambda job: fit(*job), jobs, n_jobs)

    beta = np.zeros((t_count, k, m), np.float32)
    se = np.zeros_like(beta)
    z = np.zeros_like(beta)
    lambdas = np.zeros(t_count)
    cv_r2 = np.zeros(t_count)
    group_fits: list[GroupFit] = []
    parts: list = [None] * t_count
    for (t, _, tag), (res, part) in zip(jobs, fits, strict=True):
        if tag == 0:
            # Step 6 reads the influences K times per transition; column-major instead of
            # beside it, so that no second copy is held (0.7 GB at 1000 classes x 8192).
            parts[t] = part.by_column() if isinstance(part, _Influence) else part
            beta[t], se[t], z[t] = res.beta, res.beta_se, res.z
            lambdas[t], cv_r2[t] = res.lam, res.cv_r2
        else:
            group_fits.append(GroupFit(t, tag - 1, res))
    lead_errors = (None if any(part is None for part in parts)
                   else LeadErrors(tuple(parts), standard_errors, (n, k, m)))
    return Mapping(
        beta=beta,
        beta_se=se,
        z=z,
        lambdas=lambdas,
        cv_r2=cv_r2,
        lambda_mode="cv" if lam == "cv" else "fixed",
        alphas=np.asarray(alphas, np.float64) if lam == "cv" else np.zeros(0),
        n_boot=int(n_boot),
        seed=int(seed),
        group_fits=tuple(group_fits),
        skipped_groups=tuple(skipped),
        min_group_size=int(min_group_size),
        standard_errors=standard_errors,
        lead_errors=lead_errors,
    )


# --------------------------------------------------------------------------- per class


@dataclass(frozen=True, eq=False)
class ClassMapping:
    """Class-conditional ridge fits: ``beta[t, :, c]`` maps the intensity changes of the
    samples *of class c* to their own confidence changes in ``c``.

    Grad-CAM targets the true class, so a sample's intensity is evidence for its own
    class; a global fit also reads it against every other class's confidence, where
    co-occurring prototypes of similar classes pull β the other way. The class-conditional
    fit is what "support for class c" is read from in Step 6 (beyond the paper, which
    fits one global β).

    Attributes:
        beta, beta_se, z: ``float32 (T, K, M)``.
        lambdas: ``float64 (T, M)``.
    """

    beta: np.ndarray
    beta_se: np.ndarray
    z: np.ndarray
    lambdas: np.ndarray


def fit_class_mapping(
    delta_p: object,
    delta_y: object,
    labels: object,
    *,
    lam: float | Literal["cv"] = "cv",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    standard_errors: StandardErrors = "jackknife",
    n_boot: int = 100,
    seed: int = 0,
    n_jobs: int | None = None,
) -> ClassMapping:
    """Per transition and class, ridge of class-c samples' ``ΔP`` on their ``ΔY_c``.

    Seeds are ``[seed, t, 1000 + c]``, apart from :func:`fit_mapping`'s. ``n_jobs`` as in
    :func:`fit_mapping`.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dp = rng.normal(size=(2, 60, 3))
    >>> dy = rng.normal(size=(2, 60, 2))
    >>> fit_class_mapping(dp, dy, np.repeat([0, 1], 30)).beta.shape
    (2, 3, 2)
    """
    dp = _as_array(delta_p, "delta_p")
    dy = _as_array(delta_y, "delta_y")
    y = _as_array(labels, "labels")
    if dp.ndim != 3 or dy.ndim != 3 or dp.shape[:2] != dy.shape[:2] or y.shape != dp.shape[1:2]:
        raise WhylookError(
            f"delta_p (T, n, K), delta_y (T, n, M) and labels (n,) must agree, got "
            f"{dp.shape}, {dy.shape} and {y.shape}"
        )
    _check_standard_errors(standard_errors)
    check_n_jobs(n_jobs)
    t_count, _, k = dp.shape
    m = dy.shape[2]
    beta = np.zeros((t_count, k, m), np.float32)
    se = np.full((t_count, k, m), np.nan, np.float32)
    z = np.zeros((t_count, k, m), np.float32)
    lambdas = np.full((t_count, m), np.nan)
    members = {c: rows for c in range(m) if (rows := np.flatnonzero(y == c)).size >= 3}
    jobs = [(c, t) for c in members for t in range(t_count)]

    def fit(job: tuple[int, int]) -> RidgeFit:
        c, t = job
        rows = members[c]
        # _ridge_fit, not ridge_fit: BLAS is already limited below, and setting up
        # threadpool_limits per call (T*M times) cost ~10 ms each, as much as the fits.
        return _ridge_fit(dp[t, rows], dy[t, rows, c:c + 1], lam=lam, alphas=alphas,
                          standard_errors=standard_errors, n_boot=n_boot,
                          seed=[seed, t, 1000 + c])

    with _one_blas_thread():
        fits = thread_map(fit, jobs, n_jobs)
    for (c, t), res in zip(jobs, fits, strict=True):
        beta[t, :, c] = res.beta[:, 0]
        se[t, :, c] = res.beta_se[:, 0]
        # The fit's own z: 0 for a prototype whose intensity never changes in the class
        # (beta and se both rounding errors), as in every fit (_ridge_fit).
        z[t, :, c] = res.z[:, 0]
        lambdas[t, c] = res.lam
    return ClassMapping(beta=beta, beta_se=se, z=np.nan_to_num(z), lambdas=lambdas)
