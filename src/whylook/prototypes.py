"""Step 1: abstract prototypes — streaming PCA + K-Means over every feature position.

Every spatial position of every sample's feature map ``F_i = f_L(x_i; theta_T)`` is one
``d``-vector. Prototypes are the K-Means centres of these vectors after PCA to
``p = min(d, 64)`` dimensions, and each position is assigned to its nearest centre.

Memory stays flat in the number of samples N: nothing holds ``N*h*w*d`` floats.

* One pass over feature batches accumulates the count, mean and centred scatter matrix
  (float64, combined with Chan et al.'s pairwise update, which is numerically stable and
  lets shards merge exactly), plus a fixed-size random subsample of raw vectors.
* The subsample is "bottom-m by hash": each vector gets a pseudo-random key from
  ``(seed, sample index, position)`` and the ``max_fit_vectors`` smallest keys are kept.
  It is the same subsample however the data is batched or sharded, and shard samples
  merge by keeping the smallest keys of their union.
* :meth:`PrototypeFinder.finalize` eigendecomposes the covariance (PCA, signs fixed so
  that each component's largest-magnitude entry is positive, as in scikit-learn), projects
  the subsample and fits scikit-learn's ``KMeans`` on it with a fixed seed.

Peak memory is about ``max_fit_vectors * d * 4`` bytes for the subsample plus ``d*d``
float64 for the covariance plus one batch.

Prototypes are numbered by how many subsample positions they hold, most common first, so
``P-0`` is the most frequent pattern (usually background).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from sklearn.cluster import KMeans

from whylook._checks import is_whole
from whylook._memory import small_pages
from whylook._progress import progress_bar
from whylook.errors import WhylookError
from whylook.saliency import from_numpy

__all__ = [
    "DEFAULT_AUTO_CANDIDATES",
    "FeatureStats",
    "PrototypeFinder",
    "Prototypes",
    "default_k",
    "kmeans_algorithm",
]

FeatureArray = np.ndarray | torch.Tensor

#: Candidate K for ``k="auto"`` (a ~1.5x geometric grid spanning the paper's 32 and 128).
DEFAULT_AUTO_CANDIDATES: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 64, 96, 128)
#: Vectors of the subsample used to score the candidates of ``k="auto"``.
AUTO_FIT_VECTORS = 20_000
#: K-Means finds its centres on this many vectors of the subsample, then ``REFINE_ITER``
#: Lloyd iterations run over all of it. One K-Means seed differs from the next by more
#: than this costs: on 98,000 MNIST vectors (p = 64, K = 32, seeds 0-4) the inertia over
#: all vectors averaged 6.035e6 against 6.027e6 for fits on all of them (+0.13 %; those
#: fits' own seeds span 6.007-6.070e6), the partitions agree with the full fit of the same
#: seed about as well as two seeds of the full fit agree (adjusted Rand 0.73 and 0.75),
#: and it took 0.44 s instead of 1.45 s (``benchmarks/bench_kmeans.py``).
INIT_VECTORS = 20_000
REFINE_ITER = 10
#: scikit-learn's K-Means algorithm; ``"auto"``: :func:`kmeans_algorithm` picks by CPU.
KMEANS_ALGORITHM: Literal["auto", "elkan", "lloyd"] = "auto"
_MAX_K = int(np.iinfo(np.int16).max)


def kmeans_algorithm(choice: str = KMEANS_ALGORITHM) -> Literal["elkan", "lloyd"]:
    """The K-Means algorithm that ``choice`` names; ``"auto"``: the faster here.

    Both run Lloyd's iterations and differ only where float rounding breaks a tie.
    Lloyd's computes the distances as one float32 matrix product; Elkan's skips most of
    them with triangle-inequality bounds and computes the rest one by one. With AVX-512
    the matrix product wins: the prototype fit 1.29x faster with Lloyd's on a 2-core Xeon
    (98,000 vectors, K = 32, 1 thread, the same partitions for seeds 0-4); on an AVX2 CPU
    (AMD EPYC) Elkan's was 1.27-1.35x faster (benchmarks/RESULTS.md, "Elkan K-Means").

    >>> kmeans_algorithm("elkan")
    'elkan'
    """
    if choice in ("elkan", "lloyd"):
        return "elkan" if choice == "elkan" else "lloyd"
    if choice != "auto":
        raise WhylookError(f"algorithm must be 'auto', 'elkan' or 'lloyd', not {choice!r}")
    return "lloyd" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "elkan"


def default_k(channels: int) -> int:
    """The paper's K: 32 for grayscale (MNIST-like) data, 128 for colour (CIFAR-like).

    >>> default_k(1), default_k(3)
    (32, 128)
    """
    if not is_whole(channels) or channels < 1:
        raise WhylookError(f"channels must be a positive integer, not {channels!r}")
    return 32 if channels == 1 else 128


# --------------------------------------------------------------------------- helpers


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser: a fast, well-mixed 64-bit hash (wraps mod 2^64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _position_keys(sample_index: np.ndarray, hw: int, seed: int) -> np.ndarray:
    ids = sample_index.astype(np.uint64)[:, None] * np.uint64(hw) + np.arange(hw, dtype=np.uint64)
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _splitmix64(ids.ravel() ^ salt)


def _as_feature_tensor(features: FeatureArray) -> torch.Tensor:
    if isinstance(features, np.ndarray):
        if features.dtype.kind != "f":
            raise WhylookError(f"features must be floating point, not {features.dtype}")
        t = from_numpy(features)
    elif isinstance(features, torch.Tensor):
        if not features.is_floating_point():
            raise WhylookError(f"features must be floating point, not {features.dtype}")
        t = features.detach()
    else:
        raise WhylookError(
            f"features must be a numpy array or torch tensor (B, d, h, w), not "
            f"{type(features).__name__}"
        )
    if t.ndim != 4:
        raise WhylookError(f"features must have shape (B, d, h, w), got {tuple(t.shape)}")
    if t.shape[2] * t.shape[3] < 4:
        raise WhylookError(
            f"features have a {t.shape[2]}x{t.shape[3]} spatial map; prototypes need h*w >= 4, "
            "so choose an earlier layer"
        )
    return t


def _flatten_positions(t: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B*h*w, d), rows ordered by (sample, row, column)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _merge_moments(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise merge of (count, mean, centred scatter)."""
    if n_a == 0:
        return n_b, mean_b.copy(), m2_b.copy()
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
    return n, mean, m2


class _Subsample:
    """The ``m`` vectors with the smallest keys seen so far ("bottom-m" sampling).

    Until ``m`` vectors have arrived, batches are only collected; afterwards the sample is
    updated in place, so a batch costs O(m) key comparisons but never a copy of the
    ``m x d`` vectors.
    """

    def __init__(self, m: int) -> None:
        self.m = m
        self._key_chunks: list[np.ndarray] = []
        self._vec_chunks: list[np.ndarray] = []
        self._size = 0
        self.keys: np.ndarray | None = None  # set once full
        self.vectors: np.ndarray | None = None

    @property
    def full(self) -> bool:
        return self.keys is not None

    def threshold(self) -> np.uint64 | None:
        """Keys at or above this cannot enter any more (``None`` while not full)."""
        return None if self.keys is None else self.keys.max()

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if keys.size == 0:
            return
        if self.keys is None:
            self._key_chunks.append(keys)
            self._vec_chunks.append(vectors)
            self._size += keys.size
            if self._size >= self.m:
                all_keys = np.concatenate(self._key_chunks)
                keep = np.argpartition(all_keys, self.m - 1)[: self.m]
                self.keys = all_keys[keep]
                self.vectors = np.concatenate(self._vec_chunks)[keep]
                self._key_chunks, self._vec_chunks = [], []
            return
        assert self.vectors is not None
        keep = np.argpartition(np.concatenate([self.keys, keys]), self.m - 1)[: self.m]
        incoming = keep[keep >= self.m] - self.m
        if incoming.size == 0:
            return
        stays = np.zeros(self.m, dtype=bool)
        stays[keep[keep < self.m]] = True
        free = np.flatnonzero(~stays)
        self.keys[free] = keys[incoming]
        self.vectors[free] = vectors[incoming]

    def arrays(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        if self.keys is not None and self.vectors is not None:
            return self.keys, self.vectors
        if not self._key_chunks:
            return np.zeros(0, np.uint64), np.zeros((0, d), np.float32)
        return np.concatenate(self._key_chunks), np.concatenate(self._vec_chunks)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mergeable sufficient statistics of one shard of feature vectors.

    Attributes:
        n: number of vectors seen (samples x positions).
        mean: ``float64 (d,)``.
        m2: ``float64 (d, d)``, centred scatter ``sum (x - mean)(x - mean)^T``.
        keys: ``uint64 (m,)`` hash keys of the subsampled vectors.
        vectors: ``float32 (m, d)`` the subsampled raw vectors.
        hw: positions per sample (``h*w``), which the keys depend on.
        max_fit_vectors, seed: the subsample's settings; shards must agree on them.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray
    keys: np.ndarray
    vectors: np.ndarray
    hw: int
    max_fit_vectors: int
    seed: int

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of two disjoint shards (exact, order-independent)."""
        if (self.hw, self.max_fit_vectors, self.seed) != (
            other.hw,
            other.max_fit_vectors,
            other.seed,
        ) or self.mean.shape != other.mean.shape:
            raise WhylookError(
                "feature statistics from different layers or settings cannot be merged; "
                "use the same layer, max_fit_vectors and seed for every shard"
            )
        n, mean, m2 = _merge_moments(self.n, self.mean, self.m2, other.n, other.mean, other.m2)
        sample = _Subsample(self.max_fit_vectors)
        sample.add(self.keys, self.vectors)
        sample.add(other.keys, other.vectors)
        keys, vectors = sample.arrays(self.mean.shape[0])
        return FeatureStats(n, mean, m2, keys, vectors, self.hw, self.max_fit_vectors, self.seed)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for caching (``np.savez``); see :meth:`from_arrays`."""
        return {
            "n": np.array(self.n, np.int64),
            "mean": self.mean,
            "m2": self.m2,
            "keys": self.keys,
            "vectors": self.vectors,
            "settings": np.array([self.hw, self.max_fit_vectors, self.seed], np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureStats:
        """Rebuild statistics saved with :meth:`to_arrays`."""
        try:
            hw, m, seed = (int(v) for v in arrays["settings"])
            return cls(
                int(arrays["n"]),
                np.asarray(arrays["mean"], np.float64),
                np.asarray(arrays["m2"], np.float64),
                np.asarray(arrays["keys"], np.uint64),
                np.asarray(arrays["vectors"], np.float32),
                hw,
                m,
                seed,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise WhylookError(
                f"cached feature statistics are incomplete ({exc}); delete the cache and rerun"
            ) from None


# --------------------------------------------------------------------------- prototypes


@dataclass(frozen=True, eq=False)
class Prototypes:
    """Fitted prototypes: the PCA and K-Means model of Step 1.

    Attributes:
        mean: ``float64 (d,)`` feature mean.
        components: ``float64 (p, d)`` PCA axes (rows), sign-fixed.
        centers: ``float64 (K, p)`` K-Means centres in PCA space, most common first.
        k: number of prototypes K.
        explained_variance_ratio: ``float64 (p,)`` share of the total variance per axis.
        n_vectors: feature vectors the PCA saw; ``n_fit_vectors``: those K-Means saw.
        k_candidates, k_inertia: for ``k="auto"``, the K tried and their K-Means inertia
            on the scoring subsample (empty arrays when K was given).
    """

    mean: np.ndarray
    components: np.ndarray
    centers: np.ndarray
    k: int
    explained_variance_ratio: np.ndarray
    n_vectors: int = 0
    n_fit_vectors: int = 0
    k_candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    k_inertia: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))

    @property
    def d(self) -> int:
        """Feature channels of the layer."""
        return int(self.mean.shape[0])

    def centers_in_feature_space(self) -> np.ndarray:
        """``(K, d)`` centres mapped back through the PCA (exact when ``p == d``)."""
        return self.centers @ self.components + self.mean

    def project(self, features: FeatureArray) -> np.ndarray:
        """PCA coordinates of every position: ``(B, d, h, w) -> float64 (B, h, w, p)``."""
        t = _as_feature_tensor(features)
        self._check_d(t)
        b, _, h, w = t.shape
        z = (_flatten_positions(t).double().cpu().numpy() - self.mean) @ self.components.T
        return z.reshape(b, h, w, -1)

    def assign(self, features: FeatureArray, *, chunk_vectors: int = 1 << 16) -> np.ndarray:
        """Nearest prototype of every position: ``(B, d, h, w) -> int16 (B, h, w)``.

        Runs on the features' device, in float64. The projection and distance fold into
        one ``d x K`` matrix: ``argmin_k |W(x - mu) - c_k|^2 =
        argmin_k (|c_k|^2 + 2 c_k.W mu - 2 x.(W^T c_k))``.

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> feats = rng.normal(size=(20, 4, 3, 3)).astype(np.float32)
        >>> protos = PrototypeFinder(k=3).fit([feats])
        >>> protos.assign(feats).shape
        (20, 3, 3)
        """
        t = _as_feature_tensor(features)
        self._check_d(t)
        b, _, h, w = t.shape
        g = self.components.T @ self.centers.T  # (d, K)
        bias = (self.centers**2).sum(1) + 2.0 * (self.mean @ g)
        g_t = torch.from_numpy(g).to(t.device)
        bias_t = torch.from_numpy(bias).to(t.device)
        x = _flatten_positions(t)
        out = torch.empty(x.shape[0], dtype=torch.int16, device=t.device)
        for lo in range(0, x.shape[0], chunk_vectors):
            chunk = x[lo : lo + chunk_vectors].double()
            out[lo : lo + chunk_vectors] = torch.argmin(bias_t - 2.0 * (chunk @ g_t), dim=1).to(
                torch.int16
            )
        return out.reshape(b, h, w).cpu().numpy()

    def _check_d(self, t: torch.Tensor) -> None:
        if t.shape[1] != self.d:
            raise WhylookError(
                f"features have {t.shape[1]} channels but the prototypes were fitted on "
                f"{self.d}; use the same layer for both"
            )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for caching (``np.savez``); see :meth:`from_arrays`."""
        return {
            "mean": self.mean,
            "components": self.components,
            "centers": self.centers,
            "explained_variance_ratio": self.explained_variance_ratio,
            "counts": np.array([self.k, self.n_vectors, self.n_fit_vectors], np.int64),
            "k_candidates": self.k_candidates,
            "k_inertia": self.k_inertia,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Prototypes:
        """Rebuild prototypes saved with :meth:`to_arrays`.

        >>> import numpy as np
        >>> feats = np.random.default_rng(0).normal(size=(20, 4, 3, 3)).astype(np.float32)
        >>> protos = PrototypeFinder(k=3).fit([feats])
        >>> again = Prototypes.from_arrays(protos.to_arrays())
        >>> bool((again.assign(feats) == protos.assign(feats)).all())
        True
        """
        try:
            k, n_vectors, n_fit = (int(v) for v in arrays["counts"])
            protos = cls(
                mean=np.asarray(arrays["mean"], np.float64),
                components=np.asarray(arrays["components"], np.float64),
                centers=np.asarray(arrays["centers"], np.float64),
                k=k,
                explained_variance_ratio=np.asarray(arrays["explained_variance_ratio"], np.float64),
                n_vectors=n_vectors,
                n_fit_vectors=n_fit,
                k_candidates=np.asarray(arrays.get("k_candidates", np.zeros(0)), np.int64),
                k_inertia=np.asarray(arrays.get("k_inertia", np.zeros(0)), np.float64),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise WhylookError(
                f"cached prototypes are incomplete ({exc}); delete the cache and rerun"
            ) from None
        p, d = protos.components.shape
        if protos.mean.shape != (d,) or protos.centers.shape != (k, p):
            raise WhylookError("cached prototypes have inconsistent shapes; delete the cache")
        return protos


# --------------------------------------------------------------------------- fitting


class PrototypeFinder:
    """Streaming PCA + K-Means (docs/METHOD-NOTES.md, Step 1), scikit-learn style.

    Args:
        k: number of prototypes, or ``"auto"`` to pick it from ``auto_candidates`` by the
            elbow of the K-Means inertia curve (see :meth:`finalize`).
        n_components: PCA dimensions p; default ``min(d, 64)``.
        max_fit_vectors: size of the seeded subsample K-Means is fitted on.
        seed: seeds the subsample and K-Means.
        n_init, max_iter: passed to ``sklearn.cluster.KMeans`` for the fit that finds the
            centres (on ``init_vectors`` of the subsample, see :meth:`finalize`).
        init_vectors: how many vectors of the subsample that fit sees; ``None`` fits all.
        refine_iter: Lloyd iterations over the whole subsample from those centres.
        auto_candidates: K values tried by ``k="auto"``.
        algorithm: scikit-learn's K-Means algorithm, ``"elkan"`` or ``"lloyd"``; both run
            Lloyd's iterations and differ only where float rounding breaks a tie. ``"auto"``
            (default): the faster on this CPU (:func:`kmeans_algorithm`).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> finder = PrototypeFinder(k=4, seed=0)
    >>> for lo in range(0, 60, 20):   # stream batches (B, d, h, w); pass sample_index
    ...     _ = finder.partial_fit(rng.normal(size=(20, 8, 4, 4)).astype(np.float32),
    ...                            sample_index=np.arange(lo, lo + 20))
    >>> protos = finder.finalize()
    >>> protos.k, protos.components.shape
    (4, (8, 8))
    """

    def __init__(
        self,
        k: int | Literal["auto"],
        *,
        n_components: int | None = None,
        max_fit_vectors: int = 200_000,
        seed: int = 0,
        n_init: int = 1,
        max_iter: int = 300,
        init_vectors: int | None = INIT_VECTORS,
        refine_iter: int = REFINE_ITER,
        auto_candidates: Sequence[int] = DEFAULT_AUTO_CANDIDATES,
        algorithm: Literal["auto", "elkan", "lloyd"] = KMEANS_ALGORITHM,
    ) -> None:
        if k != "auto" and (not is_whole(k) or k < 2):
            raise WhylookError(f"k must be an integer >= 2 or 'auto', not {k!r}")
        if k != "auto" and k > _MAX_K:
            raise WhylookError(f"k must be at most {_MAX_K} (assignments are int16), not {k}")
        if n_components is not None and (not is_whole(n_components) or n_components < 1):
            raise WhylookError(f"n_components must be a positive integer, not {n_components!r}")
        if not is_whole(max_fit_vectors) or max_fit_vectors < 2:
            raise WhylookError(f"max_fit_vectors must be an integer >= 2, not {max_fit_vectors!r}")
        if init_vectors is not None and (not is_whole(init_vectors) or init_vectors < 2):
            raise WhylookError(
                f"init_vectors must be an integer >= 2 or None, not {init_vectors!r}"
            )
        if not is_whole(refine_iter) or refine_iter < 1:
            raise WhylookError(f"refine_iter must be a positive integer, not {refine_iter!r}")
        candidates = sorted({int(c) for c in auto_candidates})
        if k == "auto" and (len(candidates) < 3 or candidates[0] < 2):
            raise WhylookError("auto_candidates needs at least 3 distinct values >= 2")
        self.k = k if k == "auto" else int(k)
        self.n_components = n_components
        self.max_fit_vectors = max_fit_vectors
        self.seed = int(seed)
        self.n_init = n_init
        self.max_iter = max_iter
        self.init_vectors = init_vectors
        self.refine_iter = refine_iter
        self.auto_candidates = tuple(candidates)
        self.algorithm = kmeans_algorithm(algorithm)
        self._n = 0
        self._mean = np.zeros(0)
        self._m2 = np.zeros((0, 0))
        self._hw = 0
        self._sample = _Subsample(max_fit_vectors)
        self._next_index = 0

    # -- accumulation

    @property
    def stats(self) -> FeatureStats | None:
        """A copy of the statistics accumulated so far (``None`` before any data), to cache
        or to merge elsewhere with :meth:`FeatureStats.merge` / :meth:`add_stats`."""
        if self._n == 0:
            return None
        keys, vectors = self._sample.arrays(self._mean.shape[0])
        return FeatureStats(
            self._n,
            self._mean.copy(),
            self._m2.copy(),
            keys.copy(),
            vectors.copy(),
            self._hw,
            self.max_fit_vectors,
            self.seed,
        )

    def _check_shape(self, d: int, hw: int) -> None:
        if self._n and (self._mean.shape[0], self._hw) != (d, hw):
            raise WhylookError(
                f"feature batch has shape (d={d}, h*w={hw}) but earlier batches had "
                f"(d={self._mean.shape[0]}, h*w={self._hw}); use one layer and one input size "
                "throughout"
            )

    def _add_moments(self, n: int, mean: np.ndarray, m2: np.ndarray, hw: int) -> None:
        self._check_shape(mean.shape[0], hw)
        self._n, self._mean, self._m2 = _merge_moments(self._n, self._mean, self._m2, n, mean, m2)
        self._hw = hw

    def partial_fit(
        self, features: FeatureArray, *, sample_index: np.ndarray | Sequence[int] | None = None
    ) -> PrototypeFinder:
        """Add one batch of feature maps ``(B, d, h, w)`` (numpy or torch, any device).

        ``sample_index`` (``(B,)`` distinct ints, e.g. rows of the prototype set) fixes
        which positions the subsample keeps independently of batching and sharding; when
        omitted, batches are numbered consecutively in the order they arrive.
        """
        t = _as_feature_tensor(features)
        b, d, h, w = t.shape
        if b == 0:
            return self
        hw = h * w
        self._check_shape(d, hw)
        if sample_index is None:
            index = np.arange(self._next_index, self._next_index + b, dtype=np.int64)
        else:
            index = np.asarray(sample_index)
            if index.shape != (b,) or index.dtype.kind not in "iu" or index.min() < 0:
                raise WhylookError(
                    f"sample_index must be {b} non-negative integers, one per feature map"
                )
        self._next_index = max(self._next_index, int(index.max()) + 1)

        x = _flatten_positions(t)
        x64 = x.double()
        bmean = x64.mean(0)
        xc = x64 - bmean
        bm2 = (xc.T @ xc).cpu().numpy()
        bmean_np = bmean.cpu().numpy()
        del x64, xc
        if not (np.isfinite(bmean_np).all() and np.isfinite(bm2).all()):
            raise WhylookError("features contain NaN or infinite values; check the model")
        self._add_moments(x.shape[0], bmean_np, bm2, hw)

        keys = _position_keys(index, hw, self.seed)
        threshold = self._sample.threshold()
        # Once the sample is full only keys below its largest can enter: moving just those
        # rows off the device keeps the cost per batch small.
        take = np.arange(keys.size) if threshold is None else np.flatnonzero(keys < threshold)
        if take.size:
            rows = x.index_select(0, torch.from_numpy(take).to(x.device))
            self._sample.add(keys[take], rows.float().cpu().numpy())
        return self

    def add_stats(self, stats: FeatureStats) -> PrototypeFinder:
        """Merge the statistics of another shard (e.g. computed by another worker)."""
        if (stats.max_fit_vectors, stats.seed) != (self.max_fit_vectors, self.seed):
            raise WhylookError(
                "these statistics were accumulated with another max_fit_vectors or seed; use "
                "the same settings for every shard"
            )
        if stats.n == 0:
            return self
        self._add_moments(stats.n, stats.mean, stats.m2, stats.hw)
        self._sample.add(stats.keys, stats.vectors)
        return self

    # -- fitting

    def fit(self, batches: Iterable[FeatureArray]) -> Prototypes:
        """``partial_fit`` every batch, then :meth:`finalize`."""
        for batch in batches:
            self.partial_fit(batch)
        return self.finalize()

    def finalize(self, *, progress: bool | None = False) -> Prototypes:
        """PCA from the accumulated covariance, then K-Means on the projected subsample.

        K-Means (k-means++, then Lloyd iterations, computed by Elkan's exact method) finds
        its centres on the first ``init_vectors`` vectors of the subsample in key order (a
        seeded random part), then ``refine_iter`` Lloyd iterations move them over the
        whole subsample.

        With ``k="auto"``, K-Means is fitted for every candidate K on the first
        ``AUTO_FIT_VECTORS`` vectors of the subsample, and K is the elbow ("kneedle") of the
        inertia curve: after scaling ``log K`` and inertia to [0, 1], the candidate farthest
        below the chord from the first to the last point. Deterministic for a seed.
        ``progress`` shows a bar over the candidates (see :func:`whylook.grad_cam`).
        """
        stats = self.stats
        if stats is None or stats.n < 2:
            raise WhylookError(
                "no feature vectors to fit prototypes on; pass feature batches first"
            )
        d = stats.mean.shape[0]
        p = min(d, 64) if self.n_components is None else self.n_components
        if p > d:
            raise WhylookError(f"n_components={p} exceeds the {d} feature channels")
        components, evr = _pca(stats.m2 / (stats.n - 1), p)
        # The arrays of the projection and of K-Means are large and short-lived (see
        # whylook/_memory.py).
        with small_pages():
            return self._fit(stats, components, evr, progress)

    def _fit(self, stats: FeatureStats, components: np.ndarray, evr: np.ndarray,
             progress: bool | None) -> Prototypes:
        # Sorting by key makes K-Means see the same rows in the same order however the
        # statistics were sharded.
        order = np.argsort(stats.keys, kind="stable")
        z = _project(stats.vectors, order, stats.mean, components)
        available = z.shape[0]

        candidates = np.zeros(0, np.int64)
        inertia = np.zeros(0, np.float64)
        seeded: np.ndarray | None = None
        if self.k == "auto":
            usable = [c for c in self.auto_candidates if c < min(available, AUTO_FIT_VECTORS)]
            if len(usable) < 3:
                raise WhylookError(
                    f"k='auto' needs at least 3 candidate K below the {available} feature vectors; "
                    "give K explicitly or more samples"
                )
            candidates = np.array(usable, np.int64)
            fits = [self._kmeans(z[:AUTO_FIT_VECTORS], int(c))
                    for c in progress_bar(usable, desc="prototypes: K search", total=len(usable),
                                          progress=progress)]
            inertia = np.array([km.inertia_ for km in fits])
            chosen = _knee(np.log(candidates), inertia)
            k = int(candidates[chosen])
            if self.init_vectors == AUTO_FIT_VECTORS:
                # The chosen candidate's fit is the one _fit_centers would start from.
                seeded = fits[chosen].cluster_centers_
        else:
            k = int(self.k)
        if k > available:
            more = (
                f"raise max_fit_vectors (now {self.max_fit_vectors}) or "
                if stats.n > available
                else ""
            )
            raise WhylookError(
                f"K={k} prototypes need at least {k} feature vectors but only {available} are "
                f"available; {more}lower K or use more samples"
            )
        km = self._fit_centers(z, k, seeded)
        centers = km.cluster_centers_.astype(np.float64)
        counts = np.bincount(km.labels_, minlength=k)
        centers = centers[np.argsort(-counts, kind="stable")]
        return Prototypes(
            mean=stats.mean.copy(),
            components=components,
            centers=centers,
            k=k,
            explained_variance_ratio=evr,
            n_vectors=int(stats.n),
            n_fit_vectors=int(available),
            k_candidates=candidates,
            k_inertia=inertia,
        )

    def _fit_centers(self, z: np.ndarray, k: int, seeded: np.ndarray | None) -> KMeans:
        """K-Means on the first ``init_vectors`` rows, refined over all rows of ``z``.

        ``z`` is in key order, so its first rows are a seeded random part of it.
        """
        m = self.init_vectors
        if seeded is None and (m is None or z.shape[0] <= m):
            return self._kmeans(z, k)
        if seeded is None:
            try:
                seeded = self._kmeans(z[:m], k).cluster_centers_
            except WhylookError:
                # Too few distinct vectors in the part: decide on all of them.
                return self._kmeans(z, k)
        return self._kmeans(z, k, init=seeded, max_iter=self.refine_iter)

    def _kmeans(
        self, z: np.ndarray, k: int, *, init: np.ndarray | None = None, max_iter: int | None = None
    ) -> KMeans:
        from sklearn.exceptions import ConvergenceWarning

        km = KMeans(
            n_clusters=k,
            init="k-means++" if init is None else np.asarray(init, z.dtype),
            n_init=self.n_init if init is None else 1,
            max_iter=self.max_iter if max_iter is None else max_iter,
            random_state=self.seed,
            algorithm=self.algorithm,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            km.fit(z)
        if any(
            issubclass(w.category, ConvergenceWarning) and "distinct" in str(w.message)
            for w in caught
        ):
            raise WhylookError(
                f"the features have fewer than K={k} distinct vectors (is the layer dead or the "
                "model untrained?); lower K or choose another layer"
            )
        return km


def _project(
    vectors: np.ndarray,
    order: np.ndarray,
    mean: np.ndarray,
    components: np.ndarray,
    chunk: int = 8192,
) -> np.ndarray:
    """``float32 (len(order), p)`` PCA coordinates of ``vectors[order]``, in float64 chunks.

    The whole subsample in float64 would be 1.6 GB at 200,000 x 1024 (ResNet-50's layer3).
    At 98,000 x 1024 on one CPU thread, projecting it whole took 5.9 s, nearly all of it
    copies; chunks of rows give the same values bit for bit in 1.0 s
    (``benchmarks/bench_prototypes_wide.py``).
    """
    out = np.empty((order.size, components.shape[0]), dtype=np.float32)
    weights = components.T
    for lo in range(0, order.size, chunk):
        block = vectors[order[lo : lo + chunk]].astype(np.float64)
        block -= mean
        out[lo : lo + chunk] = block @ weights
    return out


def _pca(cov: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-p eigenvectors (rows, sign-fixed) and explained-variance ratios of ``cov``."""
    evals, evecs = np.linalg.eigh((cov + cov.T) / 2.0)
    evals = np.clip(evals[::-1], 0.0, None)
    components = evecs[:, ::-1][:, :p].T.copy()
    # scikit-learn's convention: the largest-magnitude entry of each axis is positive.
    biggest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(p), biggest])[:, None]
    total = evals.sum()
    evr = evals[:p] / total if total > 0 else np.zeros(p)
    return components, evr


def _knee(x: np.ndarray, y: np.ndarray) -> int:
    """Index of the elbow of a decreasing curve: farthest below its end-to-end chord."""
    xs = (x - x[0]) / (x[-1] - x[0])
    span = y.max() - y.min()
    ys = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    # The chord of a decreasing curve on the unit square runs from (0, 1) to (1, 0).
    return int(np.argmax((1.0 - xs) - ys))
