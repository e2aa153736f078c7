"""Step 3: prototype intensity, presence, mass share and deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whylook.errors import WhylookError
from whylook.intensity import activity, delta, mass_share, prototype_intensity


def _brute(saliency: np.ndarray, assignments: np.ndarray, k: int) -> np.ndarray:
    t1, n = saliency.shape[:2]
    out = np.zeros((t1, n, k))
    for t in range(t1):
        for i in range(n):
            for p in range(k):
                cells = [
                    saliency[t, i, r, c]
                    for r in range(assignments.shape[1])
                    for c in range(assignments.shape[2])
                    if assignments[i, r, c] == p
                ]
                out[t, i, p] = sum(cells) / len(cells) if cells else 0.0
    return out


def test_matches_brute_force_loop() -> None:
    rng = np.random.default_rng(0)
    k = 7  # more prototypes than a 2x3 map can hold: some are always absent
    saliency = rng.random((4, 9, 2, 3)).astype(np.float32)
    assignments = rng.integers(0, k, size=(9, 2, 3)).astype(np.int16)
    res = prototype_intensity(saliency, assignments, k)
    assert res.values.shape == (4, 9, k)
    assert res.values.dtype == np.float32
    np.testing.assert_allclose(res.values, _brute(saliency, assignments, k), rtol=1e-6)
    counts = np.array([np.bincount(a.ravel(), minlength=k) for a in assignments])
    np.testing.assert_array_equal(res.counts, counts)
    np.testing.assert_array_equal(res.presence, counts > 0)
    assert not res.presence.all()
    # A single (n, h, w) set gives (n, K), equal to one slice of the stack.
    single = prototype_intensity(saliency[2], assignments, k)
    np.testing.assert_allclose(single.values, res.values[2], rtol=1e-6)


def test_empty_prototype_is_zero_with_mask_zero() -> None:
    saliency = np.full((1, 1, 2, 2), 5.0, np.float32)
    assignments = np.zeros((1, 2, 2), np.int64)  # every position is prototype 0
    res = prototype_intensity(saliency, assignments, 3)
    np.testing.assert_array_equal(res.values, [[[5.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(res.presence, [[True, False, False]])
    assert np.isfinite(res.values).all()


def test_mass_share() -> None:
    rng = np.random.default_rng(1)
    sal = rng.random((5, 3, 3))
    sal[4] = 0.0  # a sample without any saliency: shares 0, not NaN
    ass = rng.integers(0, 4, size=(5, 3, 3))
    share = mass_share(sal, ass, 4)
    for i in range(4):
        for p in range(4):
            assert share[i, p] == pytest.approx(sal[i][ass[i] == p].sum() / sal[i].sum(), rel=1e-6)
    np.testing.assert_allclose(share[:4].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(share[4], 0.0)


def test_torch_inputs() -> None:
    # Saliency straight from autograd still requires grad: numpy cannot take it as it is.
    sal = torch.rand(2, 3, 2, 2, requires_grad=True)
    ass = torch.randint(0, 3, (3, 2, 2))
    res = prototype_intensity(sal, ass, 3)
    expected = _brute(sal.detach().numpy(), ass.numpy(), 3)
    np.testing.assert_allclose(res.values, expected, rtol=1e-6)


def test_delta() -> None:
    x = np.arange(12.0).reshape(3, 2, 2) ** 2
    np.testing.assert_array_equal(delta(x), x[1:] - x[:-1])
    with pytest.raises(WhylookError, match="two or more"):
        delta(x[:1])


def test_shape_and_range_errors() -> None:
    sal = np.zeros((2, 3, 2, 2), np.float32)
    with pytest.raises(WhylookError, match="saliency must have shape"):
        prototype_intensity(sal, np.zeros((3, 2, 3), int), 2)
    with pytest.raises(WhylookError, match="saliency must have shape"):
        prototype_intensity(sal, np.zeros((4, 2, 2), int), 2)
    with pytest.raises(WhylookError, match=r"\[0, 1\]"):
        prototype_intensity(sal, np.full((3, 2, 2), 2), 2)
    with pytest.raises(WhylookError, match=r"\[0, 1\]"):
        prototype_intensity(sal, np.full((3, 2, 2), -1), 2)
    with pytest.raises(WhylookError, match="integers"):
        prototype_intensity(sal, np.zeros((3, 2, 2), np.float32), 2)
    with pytest.raises(WhylookError, match="k must"):
        prototype_intensity(sal, np.zeros((3, 2, 2), int), 0)
    with pytest.raises(WhylookError, match=r"\(n, h, w\)"):
        mass_share(sal, np.zeros((3, 2, 2), int), 2)


def test_activity_by_hand() -> None:
    sal = np.array([[[4.0, 1.0], [1.0, 1.0]],   # intensities 4, 1 (prototype 2 absent)
                    [[2.0, 6.0], [0.0, 2.0]],   # intensities 2, 6, 1
                    [[0.0, 0.0], [0.0, 0.0]]])  # no saliency at all: 0, not NaN
    ass = np.array([[[0, 1], [1, 1]],
                    [[0, 1], [2, 2]],
                    [[0, 0], [1, 2]]])
    # Relative to each sample's own most intense prototype, not the batch's.
    act = activity(sal, ass, 3)
    assert act.dtype == np.float32
    np.testing.assert_allclose(act, [[1, 1 / 4, 0], [1 / 3, 1, 1 / 6], [0, 0, 0]], rtol=1e-6)
    # The mass rule: each prototype's share of the sample's total saliency.
    mass = activity(sal, ass, 3, rule="mass")
    np.testing.assert_allclose(mass, [[4 / 7, 3 / 7, 0], [0.2, 0.6, 0.2], [0, 0, 0]], rtol=1e-6)
    with pytest.raises(WhylookError, match=r"unknown activity rule 'area'; use one of"):
        activity(sal, ass, 3, rule="area")
    with pytest.raises(WhylookError, match=r"saliency must have shape \(n, h, w\) here"):
        activity(np.stack([sal, sal]), ass, 3)
