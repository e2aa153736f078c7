"""Step 4: HDBSCAN learning patterns."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from whylook import patterns
from whylook.errors import WhylookError
from whylook.patterns import (
    cluster,
    default_min_cluster_size,
    describe_groups,
    find_patterns,
    neighbour_search,
)


def _confidence_from_changes(changes: np.ndarray) -> np.ndarray:
    """Confidences (T+1, n, M) whose consecutive differences are ``changes`` (T, n, M)."""
    start = np.full((1, *changes.shape[1:]), 0.5)
    return np.concatenate([start, start + np.cumsum(changes, axis=0)])


def test_planted_transition_patterns_are_recovered() -> None:
    rng = np.random.default_rng(0)
    n, m = 300, 10
    truth = rng.integers(0, 3, size=(2, n))  # two transitions, three patterns each
    directions = rng.normal(0, 0.3, size=(2, 3, m))
    changes = np.stack([directions[t][truth[t]] for t in range(2)])
    changes += rng.normal(0, 0.01, changes.shape)
    pats = find_patterns(_confidence_from_changes(changes), rng.integers(0, 4, n))
    assert pats.groups.shape == (2, n)
    assert pats.groups.dtype == np.int16
    for t in range(2):
        assert adjusted_rand_score(truth[t], pats.groups[t]) > 0.95
    np.testing.assert_array_equal(pats.n_groups_per_transition, [3, 3])
    assert pats.all_noise_transitions == ()
    # The noise fraction counts the -1 labels only, not group 0 (the largest).
    np.testing.assert_array_equal(pats.noise_fraction, (pats.groups < 0).mean(axis=1))
    assert (pats.noise_fraction < 0.1).all()
    assert pats.min_cluster_size == default_min_cluster_size(n) == 15
    assert default_min_cluster_size(5000) == 100  # 2% of the samples, above the floor of 15
    # Groups are numbered by size, largest first.
    sizes = np.bincount(pats.groups[0][pats.groups[0] >= 0])
    assert (np.diff(sizes) <= 0).all()


def test_class_subgroups_from_trajectories() -> None:
    """Class 0 has two variants that differ only in *when* they are learned."""
    rng = np.random.default_rng(1)
    n_per, t_count, m = 60, 4, 3
    early = np.zeros((t_count, m))
    early[0, 0] = 0.4
    late = np.zeros((t_count, m))
    late[2, 0] = 0.4
    variant = np.repeat([0, 1], n_per // 2)
    class0 = np.where(variant[None, :, None] == 0, early[:, None], late[:, None])
    class1 = np.zeros((t_count, n_per, m))
    class1[1, :, 1] = 0.4
    changes = np.concatenate([class0, class1], axis=1) + rng.normal(
        0, 0.01, (t_count, 2 * n_per, m)
    )
    labels = np.repeat([0, 1], n_per)
    pats = find_patterns(_confidence_from_changes(changes), labels)
    assert pats.class_groups.shape == (2 * n_per,)
    assert adjusted_rand_score(variant, pats.class_groups[:n_per]) > 0.95
    np.testing.assert_array_equal(pats.classes, [0, 1])
    assert pats.n_groups_per_class[0] == 2
    np.testing.assert_array_equal(pats.class_too_small, [False, False])
    # Class 1 is one homogeneous blob: no sub-groups, flagged rather than invented.
    assert pats.class_all_noise[1]
    assert (pats.class_groups[n_per:] == -1).all()


def test_threads_do_not_change_the_patterns() -> None:
    rng = np.random.default_rng(4)
    n, m = 240, 4
    truth = rng.integers(0, 3, size=(3, n))
    changes = np.stack([rng.normal(0, 0.3, (3, m))[truth[t]] for t in range(3)])
    changes += rng.normal(0, 0.01, changes.shape)
    conf, labels = _confidence_from_changes(changes), rng.integers(0, 3, n)
    one = find_patterns(conf, labels)
    two = find_patterns(conf, labels, n_jobs=2)
    np.testing.assert_array_equal(one.groups, two.groups)
    np.testing.assert_array_equal(one.class_groups, two.class_groups)
    assert one.n_groups_per_transition.sum() >= 6  # the planted groups were found at all
    with pytest.raises(WhylookError, match="n_jobs must be"):
        find_patterns(conf, labels, n_jobs=0)


def test_many_dimensions_use_the_brute_force_search_with_the_same_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A 40-class model's confidence changes: three planted groups in 40 dimensions.
    rng = np.random.default_rng(7)
    n, d = 600, 40
    truth = rng.integers(0, 3, n)
    x = rng.normal(0, 0.3, (3, d))[truth] + rng.normal(0, 0.02, (n, d))
    used: list[str] = []
    import sklearn.cluster

    real = sklearn.cluster.HDBSCAN

    def spy(**kwargs: object) -> object:
        used.append(str(kwargs["algorithm"]))
        return real(**kwargs)

    monkeypatch.setattr(sklearn.cluster, "HDBSCAN", spy)  # patterns imports it per fit
    labels = cluster(x, min_cluster_size=20)
    assert used == ["brute"]
    tree = real(min_cluster_size=20, algorithm="kd_tree", copy=True).fit_predict(x)
    assert adjusted_rand_score(truth, labels) == 1.0
    np.testing.assert_array_equal(labels >= 0, tree >= 0)
    assert adjusted_rand_score(labels, tree) == 1.0
    # Few dimensions, or too many rows for a dense distance matrix: scikit-learn's choice.
    cluster(x[:, :10], min_cluster_size=20)
    assert used[-1] == "auto"
    assert neighbour_search(patterns.BRUTE_MAX_ROWS, patterns.BRUTE_MIN_DIM) == "brute"
    assert neighbour_search(patterns.BRUTE_MAX_ROWS + 1, patterns.BRUTE_WIDE_DIM - 1) == "auto"
    assert neighbour_search(100, patterns.BRUTE_MIN_DIM - 1) == "auto"
    # Very many dimensions (a 1000-class model's transitions): brute force for as many rows
    # as its two n x n float64 matrices fit the budget.
    widest = math.isqrt(patterns.BRUTE_MAX_BYTES // 16)
    assert patterns.brute_bytes(widest) <= patterns.BRUTE_MAX_BYTES
    assert neighbour_search(patterns.BRUTE_MAX_ROWS + 1, patterns.BRUTE_WIDE_DIM) == "brute"
    assert neighbour_search(widest, 1000) == "brute"
    assert neighbour_search(widest + 1, 1000) == "auto"


def test_brute_force_fits_side_by_side_stay_within_the_memory_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(3)
    n, m = 200, 30  # 30 classes: the transitions (30 dimensions) take the brute-force search
    conf = rng.dirichlet(np.ones(m), size=(4, n))
    labels = np.arange(n) % m
    asked: list[int] = []
    real_map = patterns.thread_map

    def spy(fn: object, items: object, n_jobs: int | None) -> object:
        asked.append(patterns.check_n_jobs(n_jobs))
        return real_map(fn, items, n_jobs)  # type: ignore[arg-type]

    monkeypatch.setattr(patterns, "thread_map", spy)
    roomy = find_patterns(conf, labels, n_jobs=4)
    # Room for exactly two of the 200-row fits at once: four threads are cut to two.
    monkeypatch.setattr(patterns, "BRUTE_MAX_BYTES", 2 * patterns.brute_bytes(n) + 1)
    tight = find_patterns(conf, labels, n_jobs=4)
    assert asked == [4, 2]
    np.testing.assert_array_equal(roomy.groups, tight.groups)
    np.testing.assert_array_equal(roomy.class_groups, tight.class_groups)
    # A budget below one fit still runs the fits, one at a time.
    monkeypatch.setattr(patterns, "BRUTE_MAX_ROWS", 10**6)
    monkeypatch.setattr(patterns, "BRUTE_MAX_BYTES", 1)
    find_patterns(conf, labels, n_jobs=4)
    assert asked[-1] == 1


def test_all_noise_is_flagged_not_crashed() -> None:
    rng = np.random.default_rng(2)
    # Three samples: too few for any cluster.
    pats = find_patterns(rng.dirichlet(np.ones(4), size=(3, 3)), np.array([0, 1, 1]))
    assert (pats.groups == -1).all()
    assert pats.all_noise_transitions == (0, 1)
    np.testing.assert_array_equal(pats.n_groups_per_transition, [0, 0])
    np.testing.assert_array_equal(pats.noise_fraction, [1.0, 1.0])
    assert pats.class_too_small.all()
    assert pats.class_all_noise.all()
    # Uniform noise: no structure, so every sample is noise and the transition is flagged.
    changes = rng.uniform(-0.5, 0.5, size=(1, 400, 10))
    labels = rng.integers(0, 2, 400)
    pats = find_patterns(_confidence_from_changes(changes), labels)
    assert pats.all_noise_transitions == (0,)
    # Per class, groups need 10% of its ~200 samples (above the floor of 15).
    np.testing.assert_array_equal(pats.class_min_cluster_size,
                                  [round(0.1 * c) for c in np.bincount(labels)])
    assert pats.class_min_cluster_size.min() > 15
    assert "all noise at transitions [0]" in pats.summary()


def test_bad_input() -> None:
    conf = np.random.default_rng(0).random((3, 10, 4))
    with pytest.raises(WhylookError, match=r"\(T\+1, n, M\)"):
        find_patterns(conf[0], np.zeros(10, int))
    with pytest.raises(WhylookError, match="labels"):
        find_patterns(conf, np.zeros(9, int))
    with pytest.raises(WhylookError, match="min_cluster_size"):
        find_patterns(conf, np.zeros(10, int), min_cluster_size=1)
    bad = conf.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(WhylookError, match="finite"):
        find_patterns(bad, np.zeros(10, int))


def test_describe_groups_by_hand() -> None:
    """Two transitions, hand-made: group 0 of transition 0 is three samples of class 1
    whose confidence moves from class 0 to class 1 by 0.3, 0.4 and 0.5; with a fit where
    prototype 2 (z 5) and prototype 0 (z 2.5) raise class 1, prototype 1 lowers it (z -4)
    and prototype 3 raises it below the threshold (z 1.9)."""
    conf = np.full((3, 5, 2), 0.5)
    for i, d in enumerate((0.3, 0.4, 0.5)):
        conf[1, i] = [0.5 - d, 0.5 + d]
    conf[2] = conf[1]
    conf[2, 3:] = [[0.9, 0.1], [0.9, 0.1]]  # samples 3-4 move to class 0 at transition 1
    labels = np.array([1, 1, 1, 0, 0])
    groups = np.array([[0, 0, 0, -1, -1], [-1, -1, -1, 0, 0]])
    z = np.zeros((4, 2))
    z[:, 1] = [2.5, -4.0, 5.0, 1.9]
    beta = np.sign(z)
    first, second = describe_groups(groups, labels, conf, fits={(0, 0): (beta, z)})
    assert (first.transition, first.group, first.size) == (0, 0, 3)
    assert first.made_of == ((1, 1.0),)
    assert first.gained == pytest.approx((1, 0.4))
    assert first.lost == pytest.approx((0, -0.4))
    assert first.drivers == ((2, 5.0), (0, 2.5))
    assert (second.transition, second.size, second.made_of) == (1, 2, ((0, 1.0),))
    assert second.gained == pytest.approx((0, 0.4))
    assert second.drivers is None  # no fit of its own
    assert describe_groups(groups, labels, conf, fits={(0, 0): (beta, z)},
                           z_threshold=3.0)[0].drivers == ((2, 5.0),)
    entry = first.to_json(["zero", "one"], [0, 10, 20])
    assert entry == {"transition": 0, "steps": [0, 10], "group": 0, "size": 3,
                     "made_of": [{"class": "one", "share": 1.0}],
                     "gained_most": {"class": "one", "change": 0.4},
                     "lost_most": {"class": "zero", "change": -0.4}, "steady": False,
                     "prototypes": [{"id": "P-2", "z": 5.0}, {"id": "P-0", "z": 2.5}]}
    with pytest.raises(WhylookError, match="groups must be"):
        describe_groups(groups[:1], labels, conf)


def test_describe_groups_marks_steady_groups() -> None:
    """A group whose confidences moved by less than a percentage point in every class (a
    late, saturated transition) still has a largest gain; it is marked steady and no
    prototype is credited with that gain, however large its z."""
    conf = np.full((2, 4, 2), 0.5)
    conf[1, :2] = [0.495, 0.505]  # samples 0-1: +0.005 for class 1
    conf[1, 2:] = [0.48, 0.52]  # samples 2-3: +0.02
    groups, labels = np.array([[0, 0, 1, 1]]), np.array([1, 1, 1, 1])
    fit = (np.ones((3, 2)), np.full((3, 2), 9.0))
    fits = {(0, 0): fit, (0, 1): fit}
    still, moved = describe_groups(groups, labels, conf, fits=fits)
    assert still.steady
    assert still.gained == pytest.approx((1, 0.005))
    assert still.drivers == ()
    assert not moved.steady
    assert moved.drivers == ((0, 9.0), (1, 9.0), (2, 9.0))
    assert still.to_json(["a", "b"], [0, 1])["steady"] is True
    (unfitted,) = describe_groups(groups[:, :2], labels[:2], conf[:, :2])
    assert unfitted.steady
    assert unfitted.drivers is None
    loose = describe_groups(groups, labels, conf, fits=fits, min_change=0.001)
    assert not any(g.steady for g in loose)
    assert loose[0].drivers
    # A loss counts too: with three classes, two gaining 0.006 each and one losing 0.012,
    # the largest gain is below a point but a class moved by more: not steady.
    three = np.full((2, 2, 3), 1 / 3)
    three[1] += [0.006, 0.006, -0.012]
    (lost,) = describe_groups(np.array([[0, 0]]), np.array([0, 0]), three,
                              fits={(0, 0): (np.ones((3, 3)), np.full((3, 3), 9.0))})
    assert lost.gained[1] < 0.01
    assert not lost.steady
    assert lost.drivers


def test_describe_groups_needs_drivers_seen_in_enough_samples() -> None:
    """A coefficient carried by one sample passes any z threshold (its bootstrap z is
    about 2.07 whatever its size): with the intensities given, a driver's attention must
    have changed in at least a tenth of the group's samples, and in five."""
    n, k = 40, 4
    conf = np.zeros((2, n, 2))
    conf[0] = 0.5
    conf[1] = [0.2, 0.8]
    intensity = np.zeros((2, n, k))
    intensity[1, :, 0] = 1.0  # prototype 0: attention changed in all 40 samples
    intensity[1, :1, 1] = 1.0  # prototype 1: in one sample only
    intensity[1, :5, 2] = 1.0  # prototype 2: in five samples (a tenth would be 4)
    intensity[1, :4, 3] = 1.0  # prototype 3: in four, a tenth of them, yet fewer than five
    z = np.zeros((k, 2))
    z[:, 1] = [3.0, 2.07, 2.5, 2.3]
    fits = {(0, 0): (np.ones((k, 2)), z)}
    groups, labels = np.zeros((1, n), int), np.ones(n, int)
    (free,) = describe_groups(groups, labels, conf, fits=fits, top=4)
    assert free.drivers == ((0, 3.0), (2, 2.5), (3, 2.3), (1, 2.07))
    (seen,) = describe_groups(groups, labels, conf, fits=fits, intensity=intensity)
    assert seen.drivers == ((0, 3.0), (2, 2.5))
    (strict,) = describe_groups(groups, labels, conf, fits=fits, intensity=intensity,
                                min_changed=0.2)
    assert strict.drivers == ((0, 3.0),)
    with pytest.raises(WhylookError, match="intensity must be"):
        describe_groups(groups, labels, conf, fits=fits, intensity=intensity[:, :3])
