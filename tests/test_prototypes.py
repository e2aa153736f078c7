"""Step 1: streaming PCA + K-Means prototypes."""

from __future__ import annotations

import tracemalloc
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from whylook.errors import WhylookError
from whylook.prototypes import FeatureStats, PrototypeFinder, Prototypes, default_k


def _planted(
    n: int, k: int = 4, d: int = 8, hw: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature maps (n, d, hw, hw) whose positions come from k tight, far-apart clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, size=(k, d))
    labels = rng.integers(0, k, size=(n, hw, hw))
    feats = centres[labels] + rng.normal(0, 0.1, size=(n, hw, hw, d))
    return feats.transpose(0, 3, 1, 2).astype(np.float32), labels, centres


def _batches(feats: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(feats), size):
        yield feats[lo : lo + size], np.arange(lo, min(lo + size, len(feats)))


def test_recovers_planted_clusters() -> None:
    feats, labels, centres = _planted(60)
    protos = PrototypeFinder(k=4, seed=0).fit([feats])
    assigned = protos.assign(feats)
    assert assigned.dtype == np.int16
    assert assigned.shape == labels.shape
    # Assignments equal the truth up to a permutation: a one-to-one contingency table.
    table = np.zeros((4, 4), int)
    np.add.at(table, (labels.ravel(), assigned.ravel().astype(int)), 1)
    assert ((table > 0).sum(axis=1) == 1).all()
    assert ((table > 0).sum(axis=0) == 1).all()
    # Centres (mapped back to feature space, exact since p = d = 8) match the truth.
    found = protos.centers_in_feature_space()
    perm = table.argmax(axis=1)
    np.testing.assert_allclose(found[perm], centres, atol=0.05)
    # Prototypes are numbered by frequency: P-0 holds the most positions.
    counts = np.bincount(assigned.ravel(), minlength=4)
    assert (np.diff(counts) <= 0).all()


def test_assign_on_torch_matches_numpy() -> None:
    feats, _, _ = _planted(10)
    protos = PrototypeFinder(k=4).fit([feats])
    np.testing.assert_array_equal(protos.assign(torch.from_numpy(feats)), protos.assign(feats))


def test_read_only_arrays_are_accepted_quietly() -> None:
    feats, _, _ = _planted(10)
    feats.flags.writeable = False  # as from np.load(..., mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        protos = PrototypeFinder(k=4).fit([feats])
        assert protos.assign(feats).shape == (10, 4, 4)


def test_streaming_and_shards_equal_one_shot() -> None:
    feats, _, _ = _planted(90, seed=1)
    # 90 samples x 16 positions = 1440 vectors; the subsample keeps 500 of them.
    settings = {"k": 4, "max_fit_vectors": 500, "seed": 3}
    one = PrototypeFinder(**settings).partial_fit(feats, sample_index=np.arange(90))

    streamed = PrototypeFinder(**settings)
    for batch, index in _batches(feats, 7):
        streamed.partial_fit(batch, sample_index=index)

    # Three shards, fitted separately (as on three workers) in scrambled order, merged.
    shard_stats = []
    for lo, hi in ((60, 90), (0, 25), (25, 60)):
        shard = PrototypeFinder(**settings)
        for batch, index in _batches(feats[lo:hi], 4):
            shard.partial_fit(batch, sample_index=index + lo)
        shard_stats.append(FeatureStats.from_arrays(shard.stats.to_arrays()))
    merged = PrototypeFinder(**settings)
    for s in shard_stats:
        merged.add_stats(s)

    ref = one.stats
    for finder in (streamed, merged):
        st = finder.stats
        assert st.n == ref.n == 1440
        np.testing.assert_allclose(st.mean, ref.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.m2, ref.m2, rtol=1e-10, atol=1e-8)
        np.testing.assert_array_equal(np.sort(st.keys), np.sort(ref.keys))
        assert st.keys.size == 500
    results = [f.finalize() for f in (one, streamed, merged)]
    for res in results[1:]:
        np.testing.assert_allclose(res.components, results[0].components, atol=1e-10)
        np.testing.assert_array_equal(res.assign(feats), results[0].assign(feats))
        # K-Means saw the same rows in the same order (sorted by key), not only rows that
        # end in the same clusters: its centres agree to far below float32 rounding (rows
        # in arrival order move them by ~4e-6 here, and assign the same).
        np.testing.assert_allclose(res.centers, results[0].centers, rtol=0, atol=1e-8)


def test_pca_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    d = 12
    mixing = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    vectors = rng.normal(size=(40 * 9, d)) @ mixing.T + 5.0
    feats = vectors.reshape(40, 3, 3, d).transpose(0, 3, 1, 2).astype(np.float32)
    protos = PrototypeFinder(k=3, n_components=5).fit([feats[:15], feats[15:]])
    flat = feats.transpose(0, 2, 3, 1).reshape(-1, d).astype(np.float64)
    ref = PCA(n_components=5, svd_solver="full").fit(flat)
    np.testing.assert_allclose(protos.mean, ref.mean_, rtol=1e-10)
    # Same axes up to sign (and our sign convention is sklearn's).
    np.testing.assert_allclose(np.abs(protos.components), np.abs(ref.components_), atol=1e-8)
    np.testing.assert_allclose(protos.components, ref.components_, atol=1e-8)
    np.testing.assert_allclose(
        protos.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8
    )
    # And against numpy's SVD of the centred data.
    _, _, vt = np.linalg.svd(flat - flat.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(protos.components), np.abs(vt[:5]), atol=1e-8)


def test_default_components_is_min_d_64() -> None:
    feats = np.random.default_rng(0).normal(size=(3, 70, 2, 2)).astype(np.float32)
    assert PrototypeFinder(k=2).fit([feats]).components.shape == (64, 70)


def test_deterministic_for_a_seed() -> None:
    feats, _, _ = _planted(30, k=6, seed=4)
    a = PrototypeFinder(k=5, seed=7, max_fit_vectors=200).fit([feats])
    b = PrototypeFinder(k=5, seed=7, max_fit_vectors=200).fit([feats])
    for name, arr in a.to_arrays().items():
        np.testing.assert_array_equal(arr, b.to_arrays()[name], err_msg=name)


def test_round_trip_arrays() -> None:
    feats, _, _ = _planted(20)
    protos = PrototypeFinder(k=4).fit([feats])
    again = Prototypes.from_arrays(protos.to_arrays())
    np.testing.assert_array_equal(again.assign(feats), protos.assign(feats))
    # Every field comes back, not only what assign reads (K search included).
    auto = PrototypeFinder(k="auto", auto_candidates=range(2, 6)).fit([feats])
    for saved in (protos, auto):
        arrays = Prototypes.from_arrays(saved.to_arrays()).to_arrays()
        assert arrays.keys() == saved.to_arrays().keys()
        for name, value in saved.to_arrays().items():
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert auto.k_inertia.size == 4
    with pytest.raises(WhylookError, match="incomplete"):
        Prototypes.from_arrays({"mean": protos.mean})


def test_k_too_large_and_bad_input() -> None:
    feats, _, _ = _planted(2)  # 2 samples x 16 positions = 32 vectors
    with pytest.raises(WhylookError, match="K=33"):
        PrototypeFinder(k=33).fit([feats])
    with pytest.raises(WhylookError, match="max_fit_vectors"):
        PrototypeFinder(k=20, max_fit_vectors=10).fit([feats])
    with pytest.raises(WhylookError, match="k must be"):
        PrototypeFinder(k=1)
    with pytest.raises(WhylookError, match="h\\*w >= 4"):
        PrototypeFinder(k=2).partial_fit(np.zeros((4, 3, 1, 1), np.float32))
    with pytest.raises(WhylookError, match="d=5"):
        PrototypeFinder(k=2).partial_fit(feats).partial_fit(feats[:, :5])
    with pytest.raises(WhylookError, match="no feature vectors"):
        PrototypeFinder(k=2).finalize()
    with pytest.raises(WhylookError, match="distinct"):
        PrototypeFinder(k=3).fit([np.ones((4, 2, 2, 2), np.float32)])
    protos = PrototypeFinder(k=4).fit([feats])
    with pytest.raises(WhylookError, match="channels"):
        protos.assign(feats[:, :3])


def test_auto_k_finds_planted_number() -> None:
    feats, _, _ = _planted(80, k=5, seed=5)
    protos = PrototypeFinder(k="auto", auto_candidates=range(2, 13)).fit([feats])
    assert protos.k == 5
    assert protos.k_candidates.tolist() == list(range(2, 13))
    assert protos.k_inertia.shape == (11,)


def test_default_k_follows_the_paper() -> None:
    assert default_k(1) == 32
    assert default_k(3) == 128


def test_memory_flat_in_n() -> None:
    """Peak memory of fitting grows <= 1.5x when N grows 6x (subsample size fixed)."""

    def peak(n: int) -> int:
        rng = np.random.default_rng(0)
        finder = PrototypeFinder(k=8, max_fit_vectors=2000, seed=0)
        tracemalloc.start()
        for lo in range(0, n, 50):
            batch = rng.normal(size=(50, 32, 4, 4)).astype(np.float32)
            finder.partial_fit(batch, sample_index=np.arange(lo, lo + 50))
        finder.finalize()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(300), peak(1800)
    assert large <= 1.5 * small, (small, large)


def test_chunked_projection_equals_the_whole_matrix_product():
    """The subsample is projected in float64 chunks (memory, speed): the same values."""
    from whylook.prototypes import _project

    rng = np.random.default_rng(3)
    vectors = rng.normal(5.0, 2.0, size=(1000, 24)).astype(np.float32)
    order = rng.permutation(1000)
    mean = vectors.astype(np.float64).mean(0)
    components = np.linalg.qr(rng.normal(size=(24, 24)))[0][:10]
    whole = ((vectors[order].astype(np.float64) - mean) @ components.T).astype(np.float32)
    assert np.array_equal(_project(vectors, order, mean, components, chunk=64), whole)
    assert _project(vectors, order[:0], mean, components).shape == (0, 10)


@pytest.fixture
def kmeans_rows(monkeypatch) -> list[int]:
    """The number of rows of every K-Means fit the prototype stage runs."""
    import whylook.prototypes as prototypes

    seen: list[int] = []

    class Spy(prototypes.KMeans):
        def fit(self, X, y=None, sample_weight=None):
            seen.append(len(X))
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(prototypes, "KMeans", Spy)
    return seen


def test_centres_found_on_a_part_are_refined_over_every_vector(kmeans_rows) -> None:
    seen = kmeans_rows
    feats, _, _ = _planted(200)  # 3,200 vectors
    protos = PrototypeFinder(k=4, seed=0, init_vectors=100).fit([feats])
    assert seen == [100, 3200]
    # Lloyd converged over all vectors: each centre is the mean of every vector assigned to
    # it, not of the 100 the centres were found on (those means differ by ~0.02 here).
    vectors = feats.transpose(0, 2, 3, 1).reshape(-1, 8).astype(np.float64)
    assigned = protos.assign(feats).ravel()
    means = np.stack([vectors[assigned == j].mean(axis=0) for j in range(4)])
    np.testing.assert_allclose(protos.centers_in_feature_space(), means, atol=1e-3)

    seen.clear()
    PrototypeFinder(k=4, seed=0, init_vectors=None).fit([feats])
    assert seen == [3200]


def test_k_auto_starts_the_refinement_from_the_chosen_candidate(kmeans_rows, monkeypatch):
    import whylook.prototypes as prototypes

    seen = kmeans_rows
    monkeypatch.setattr(prototypes, "AUTO_FIT_VECTORS", 500)
    feats, _, _ = _planted(200)
    protos = PrototypeFinder(k="auto", seed=0, init_vectors=500,
                             auto_candidates=(2, 3, 4, 6, 8)).fit([feats])
    assert protos.k == 4
    # One fit per candidate on the part, then only the refinement on all 3,200 vectors.
    assert seen == [500] * 5 + [3200]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"init_vectors": 1}, "init_vectors"), ({"init_vectors": 2.5}, "init_vectors"),
     ({"refine_iter": 0}, "refine_iter"), ({"algorithm": "full"}, "algorithm")],
)
def test_bad_kmeans_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(WhylookError, match=message):
        PrototypeFinder(k=4, **kwargs)


def test_elkan_and_lloyd_run_the_same_iterations(monkeypatch) -> None:
    """Elkan only skips distance computations that cannot change an assignment: on
    planted clusters it gives Lloyd's centres, and each runs when named."""
    import whylook.prototypes as prototypes

    algorithms: list[str] = []

    class Spy(prototypes.KMeans):
        def fit(self, X, y=None, sample_weight=None):
            algorithms.append(self.algorithm)
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(prototypes, "KMeans", Spy)
    feats, _, _ = _planted(200)
    elkan = PrototypeFinder(k=4, seed=0, init_vectors=100, algorithm="elkan").fit([feats])
    assert algorithms == ["elkan", "elkan"]
    lloyd = PrototypeFinder(k=4, seed=0, init_vectors=100, algorithm="lloyd").fit([feats])
    assert algorithms[2:] == ["lloyd", "lloyd"]
    np.testing.assert_allclose(elkan.centers, lloyd.centers, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("capability", "chosen"), [("AVX512", "lloyd"), ("AVX2", "elkan"),
                                                    ("DEFAULT", "elkan")])
def test_the_default_kmeans_is_the_faster_on_the_cpu(monkeypatch, capability, chosen) -> None:
    """Lloyd's matrix product is the faster with AVX-512 (a 2-core Xeon), Elkan's bounds
    without it (an AVX2 AMD EPYC): the default follows torch's CPU capability, and the
    finder runs what it names."""
    import whylook.prototypes as prototypes

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert prototypes.kmeans_algorithm() == chosen
    assert PrototypeFinder(k=4).algorithm == chosen
    assert PrototypeFinder(k=4, algorithm="elkan").algorithm == "elkan"
    assert PrototypeFinder(k=4, algorithm="lloyd").algorithm == "lloyd"
