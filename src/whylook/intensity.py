"""Step 3: prototype intensity — the mean saliency over each prototype's positions.

    P^t_{i,k} = sum_j 1[a_ij = k] I^t_ij / sum_j 1[a_ij = k]

where ``a`` are the prototype assignments ``(n, h, w)`` and ``I^t`` the raw Grad-CAM of
checkpoint ``t``. Where sample ``i`` has no position of prototype ``k``, ``P = 0`` and the
presence mask is ``False``; nothing is ever divided by zero.

Everything is one ``np.bincount`` over flattened ``(checkpoint, sample, prototype)``
indices, with float64 accumulation. Results are per sample, so shards of samples simply
concatenate along the sample axis.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from whylook._checks import is_whole
from whylook.errors import WhylookError

__all__ = ["ACTIVITY_RULES", "Intensity", "activity", "delta", "mass_share", "prototype_intensity"]


def _as_array(x: object, name: str) -> np.ndarray:
    """numpy view of an array-like (torch tensors on any device included)."""
    # A tensor exists only once torch is imported; reading a finished run imports none.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise WhylookError(f"{name} must be an array, not {type(x).__name__} ({exc})") from None


@dataclass(frozen=True, eq=False)
class Intensity:
    """Per-prototype intensity of every sample (and checkpoint).

    Attributes:
        values: ``float32 (T+1, n, K)`` (or ``(n, K)`` for a single saliency map set),
            the mean saliency over the prototype's positions; 0 where absent.
        presence: ``bool (n, K)``, whether the sample has any position of the prototype.
        counts: ``int32 (n, K)``, the number of positions of the prototype in the sample.
    """

    values: np.ndarray
    presence: np.ndarray
    counts: np.ndarray


def _check_assignments(assignments: object, k: int) -> np.ndarray:
    if not is_whole(k) or k < 1:
        raise WhylookError(f"k must be a positive integer, not {k!r}")
    a = _as_array(assignments, "assignments")
    if a.ndim != 3:
        raise WhylookError(f"assignments must have shape (n, h, w), got {a.shape}")
    if a.dtype.kind not in "iu":
        raise WhylookError(f"assignments must be integers, not {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= k):
        raise WhylookError(
            f"assignments must lie in [0, {k - 1}] for K={k}, found [{a.min()}, {a.max()}]; "
            "use the K the prototypes were fitted with"
        )
    return a


def _check_saliency(saliency: object, a: np.ndarray, *, allow_stack: bool) -> np.ndarray:
    s = _as_array(saliency, "saliency")
    shapes = "(T+1, n, h, w) or (n, h, w)" if allow_stack else "(n, h, w)"
    if s.ndim not in ((3, 4) if allow_stack else (3,)) or s.shape[-3:] != a.shape:
        raise WhylookError(
            f"saliency must have shape {shapes} with (n, h, w) = {a.shape} as the "
            f"assignments, got {s.shape}; use maps from the same samples and layer"
        )
    if s.dtype.kind not in "fiu":
        raise WhylookError(f"saliency must be numeric, not {s.dtype}")
    return s


def _per_prototype(values: np.ndarray, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``values (..., n, h, w)`` and position counts per (sample, prototype).

    Returns float64 sums ``(..., n, K)`` and int64 counts ``(n, K)``.
    """
    n = a.shape[0]
    lead = values.shape[:-3]
    # Index of (sample, prototype) for every position, then offset per leading slice so a
    # single bincount fills all checkpoints at once.
    cell = (np.arange(n, dtype=np.int64)[:, None] * k + a.reshape(n, -1)).ravel()
    counts = np.bincount(cell, minlength=n * k).reshape(n, k)
    m = int(np.prod(lead, dtype=np.int64))
    offsets = (np.arange(m, dtype=np.int64) * (n * k))[:, None]
    sums = np.bincount(
        (offsets + cell[None, :]).ravel(),
        weights=values.reshape(m, -1).astype(np.float64, copy=False).ravel(),
        minlength=m * n * k,
    )
    return sums.reshape(*lead, n, k), counts


def prototype_intensity(saliency: object, assignments: object, k: int) -> Intensity:
    """Mean saliency per prototype: ``(T+1, n, h, w)`` or ``(n, h, w)`` -> ``(..., n, K)``.

    Args:
        saliency: raw Grad-CAM maps, one stack per checkpoint or a single set.
        assignments: ``(n, h, w)`` prototype index of every position, in ``[0, k)``.
        k: number of prototypes.

    >>> import numpy as np
    >>> sal = np.array([[[1.0, 2.0], [3.0, 6.0]]])       # (n=1, 2, 2)
    >>> ass = np.array([[[0, 0], [1, 1]]])
    >>> res = prototype_intensity(sal, ass, k=3)
    >>> res.values.tolist(), res.presence.tolist()
    ([[1.5, 4.5, 0.0]], [[True, True, False]])
    """
    a = _check_assignments(assignments, k)
    s = _check_saliency(saliency, a, allow_stack=True)
    sums, counts = _per_prototype(s, a, int(k))
    values = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return Intensity(
        values=values.astype(np.float32),
        presence=counts > 0,
        counts=counts.astype(np.int32),
    )


def mass_share(saliency: object, assignments: object, k: int) -> np.ndarray:
    """Each prototype's share of a sample's saliency mass: ``(n, h, w) -> float32 (n, K)``.

    ``share[i, k] = sum_{j in k} I_ij / sum_j I_ij``, 0 for a sample whose map is all 0.
    Used (on the final checkpoint) to decide whether a prototype is "active" (Step 6).

    >>> import numpy as np
    >>> sal = np.array([[[1.0, 3.0], [0.0, 0.0]]])
    >>> mass_share(sal, np.array([[[0, 1], [1, 1]]]), k=2).tolist()
    [[0.25, 0.75]]
    """
    a = _check_assignments(assignments, k)
    s = _check_saliency(saliency, a, allow_stack=False)
    sums, _ = _per_prototype(s, a, int(k))
    total = sums.sum(axis=-1, keepdims=True)
    share = np.divide(sums, total, out=np.zeros_like(sums), where=total > 0)
    return share.astype(np.float32)


def delta(x: object) -> np.ndarray:
    """Change between consecutive checkpoints along axis 0: ``x[1:] - x[:-1]``.

    >>> import numpy as np
    >>> delta(np.array([[1.0], [3.0], [2.0]])).tolist()
    [[2.0], [-1.0]]
    """
    arr = _as_array(x, "x")
    if arr.ndim < 1 or arr.shape[0] < 2:
        raise WhylookError(
            f"need values at two or more checkpoints along axis 0, got shape {arr.shape}"
        )
    return arr[1:] - arr[:-1]


ACTIVITY_RULES = ("intensity", "mass")


def activity(saliency: object, assignments: object, k: int, rule: str = "intensity") -> np.ndarray:
    """How strongly each prototype is looked at in each sample: ``(n, h, w) -> float32 (n, K)``.

    ``rule="intensity"`` (the default): the prototype's intensity relative to the sample's
    most intense prototype, in [0, 1]. It is free of area: a background prototype that
    covers most of the grid with weak saliency scores low, however much mass it adds up.
    ``rule="mass"``: the prototype's share of the sample's saliency mass (the method's reading),
    which such a background prototype can reach by area alone.

    >>> import numpy as np
    >>> sal = np.array([[[4.0, 1.0], [1.0, 1.0]]])   # one salient cell, weak background
    >>> ass = np.array([[[0, 1], [1, 1]]])
    >>> activity(sal, ass, 2).tolist()
    [[1.0, 0.25]]
    >>> [round(float(x), 2) for x in activity(sal, ass, 2, "mass")[0]]
    [0.57, 0.43]
    """
    if rule == "mass":
        return mass_share(saliency, assignments, k)
    if rule != "intensity":
        raise WhylookError(f"unknown activity rule {rule!r}; use one of {ACTIVITY_RULES}")
    values = prototype_intensity(saliency, assignments, k).values
    if values.ndim != 2:
        raise WhylookError(f"saliency must have shape (n, h, w) here, got {values.shape[:-1]}")
    top = values.max(axis=1, keepdims=True)
    return np.divide(values, top, out=np.zeros_like(values), where=top > 0).astype(np.float32)

