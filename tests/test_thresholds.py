"""Every user-visible threshold of the method, exactly at its boundary.

Each rule of Steps 4-6 and each wording of the summary compares a number against a bar
(``>=`` or ``>``, ``<`` or ``<=``); a flipped comparison changes the answer only for an
input that lands on the bar, which few other tests build. Here every such input is made
on purpose, from counts whose ratio is exact in binary floating point (19 of 20 samples
is the same double as 0.95) or from values placed on the bar and one representable step
beside it (``np.nextafter``), and the documented outcome at the bar is asserted:
docs/METHOD-NOTES.md (and the module docstrings) say which side the bar itself is on.
Thresholds whose bar an existing test already hits are left to that test (the lift
wording, learning unseen from 25 %, three separated pairs for the correlation, the floor of
five changed samples). Bars that floating point missed where the documented rule is exact
(a 25-point specialized margin from rates such as 30/52 and 17/52, the near-chance bar for 7,
8 or 20 classes, a separation level of 1 - 0.18) are tested on the exact case.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from _synthetic_run import summary_data
from whylook._text import floor_pct, near_chance_caution
from whylook.errors import WhylookError
from whylook.intensity import activity
from whylook.mapping import fit_mapping, ridge_fit
from whylook.patterns import STEADY_CHANGE, cluster, describe_groups, find_patterns, is_steady
from whylook.structure import StructureSettings, assemble

M, K, T = 3, 5, 4
STEPS = [0, 1, 10, 100, 1000]


def _below(x: float) -> float:
    """The largest double below ``x``: one step on the wrong side of a bar."""
    return float(np.nextafter(x, -math.inf))


def _above(x: float) -> float:
    return float(np.nextafter(x, math.inf))


#: A step that survives sums and float32 storage, where one ulp would be rounded away:
#: every value built with it below is exact in binary.
EPS = 2.0**-20


def _base(n_per: int = 20):
    """Three classes of ``n_per`` samples; nothing looked at, nothing learned, flat
    confidences (so every class gets uniform learning weights of 1/T), β = 0, se = 1/4."""
    labels = np.repeat(np.arange(M), n_per)
    n = labels.size
    act = np.zeros((n, K))
    conf = np.full((T + 1, n, M), 1.0 / M)
    beta = np.zeros((T, K, M))
    se = np.full((T, K, M), 0.25)
    groups = -np.ones(n, dtype=np.int16)
    return labels, act, conf, beta, se, groups


def _run(labels, act, conf, beta, se, groups, lead_se=None, **settings):
    return assemble(classes=["a", "b", "c"], steps=STEPS, labels=labels, activity=act,
                    confidence=conf, beta=beta, beta_se=se, class_groups=groups,
                    settings=StructureSettings(**settings), lead_se=lead_se)


# --------------------------------------------------------------------------- Step 6: active


@pytest.mark.parametrize(("rule", "bar"), [("intensity", 0.3), ("mass", 0.1)])
def test_active_at_exactly_the_default_activity_threshold(rule, bar):
    """A prototype is active when its activity is *at least* the rule's default threshold
    (0.3 of the sample's most intense prototype; 0.1 of its saliency mass): exactly on the
    bar is active, one step below is not."""
    labels, act, conf, beta, se, groups = _base()
    rows = np.flatnonzero(labels == 0)
    act[rows[:10], 0] = bar
    act[rows[10:], 0] = _below(bar)
    s = _run(labels, act, conf, beta, se, groups, active_rule=rule)
    assert s.settings.active_threshold == bar
    assert s.active[rows[:10], 0].all()
    assert not s.active[rows[10:], 0].any()
    assert s.active_rate_by_class[0, 0] == 0.5


def test_a_prototype_three_tenths_as_intense_as_the_top_is_active():
    """End to end from saliency: intensities 10 and 3 give an activity of exactly 3/10
    (float32), which the default intensity rule counts as active; 2.99 does not."""
    sal = np.array([[[10.0, 3.0], [0.0, 0.0]], [[10.0, 2.99], [0.0, 0.0]]])
    ass = np.array([[[0, 1], [2, 2]], [[0, 1], [2, 2]]])
    act = activity(sal, ass, 3)
    assert act[0, 1] == np.float32(0.3)
    labels = np.array([0, 0])
    s = assemble(classes=["a"], steps=[0, 1], labels=labels, activity=act,
                 confidence=np.ones((2, 2, 1)), beta=np.zeros((1, 3, 1)),
                 beta_se=np.ones((1, 3, 1)), class_groups=-np.ones(2, dtype=np.int16))
    assert s.active[:, 1].tolist() == [True, False]


# --------------------------------------------------------------------------- Step 6: shared


def test_shared_at_exactly_half_of_the_class():
    """Shared prototypes are active in *at least* 50 % of the class: 10 of 20 samples is
    enough, 9 of 20 is not (support well above the threshold in both)."""
    labels, act, conf, beta, se, groups = _base()
    rows = np.flatnonzero(labels == 0)
    beta[:, 0, 0] = beta[:, 1, 0] = 1.0  # z = 1 / (0.25 / 2) = 8
    act[rows[:10], 0] = 1.0  # P-0 in 10 of 20 of a
    act[rows[:9], 1] = 1.0  # P-1 in 9 of 20 of a
    s = _run(labels, act, conf, beta, se, groups)
    assert s.active_rate_by_class[0, 0] == 0.5
    assert s.classes[0].shared == ("P-0",)


def test_support_at_exactly_the_z_threshold():
    """Support must reach the z threshold (2.0 with one fit): with uniform weights 1/4,
    β = 1/4 at every transition and se = 1/4, support is 1/4 and its error
    sqrt(4 · (1/4)² · (1/4)²) = 1/8, so z = 2 exactly: shared. A hair less β: not."""
    labels, act, conf, beta, se, groups = _base()
    act[labels == 0, :2] = 1.0  # P-0 and P-1 in every sample of a
    beta[:, 0, 0] = 0.25
    beta[:, 1, 0] = 0.25 - EPS
    s = _run(labels, act, conf, beta, se, groups)
    assert s.support_threshold == 2.0
    assert s.support_z[0, 0] == 2.0
    assert s.support_z[1, 0] == 2.0 - 8 * EPS
    assert s.classes[0].shared == ("P-0",)


# --------------------------------------------------------------------------- why_no_shared


def test_why_no_shared_reads_both_bars_inclusively():
    """A class without shared prototypes reports each half of the rule on its own, with
    the rule's own bars: a prototype in exactly half the class (without support) is among
    the most looked-at, and one at exactly z = 2 (in too few samples) is the best
    supported; it is "also looked at" in another class where it is active in exactly half
    of that class."""
    labels, act, conf, beta, se, groups = _base()
    a, b = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    act[a[:10], 0] = 1.0  # P-0: 10 of 20 of a, no support
    act[b[:10], 0] = 1.0  # ... and 10 of 20 of b
    act[a[:5], 1] = 1.0  # P-1: 5 of 20 of a, support z exactly 2
    beta[:, 1, 0] = 0.25
    why = _run(labels, act, conf, beta, se, groups).classes[0].why_no_shared
    assert why is not None
    assert why.activity_met
    assert [(c.id, c.active_rate, c.also_active_in) for c in why.most_active] == [
        ("P-0", 0.5, ("b",))]
    assert why.best_supported is not None
    assert (why.best_supported.id, why.best_supported.support_z) == ("P-1", 2.0)
    # One sample fewer, a hair less support: neither half is met.
    act[a[9], 0] = 0.0
    beta[:, 1, 0] = 0.25 - EPS
    why = _run(labels, act, conf, beta, se, groups).classes[0].why_no_shared
    assert not why.activity_met
    assert why.best_supported is None


# --------------------------------------------------------------------------- specialized


def _specialized(labels, act, conf, beta, se, groups, **settings):
    return _run(labels, act, conf, beta, se, groups, **settings).classes[1].specialized


def test_specialized_in_exactly_half_of_the_group():
    """A specialized prototype is active in *at least* half of its sub-group: 10 of a
    group of 20 (none of the other 20 of the class; Fisher p = C(20,10)/C(40,10) ≈ 2e-4)
    is enough, 9 of 20 is not."""
    labels, act, conf, beta, se, groups = _base(n_per=40)
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:20]] = 0
    act[rows_b[:10], 4] = 1.0
    assert math.comb(20, 10) / math.comb(40, 10) < 0.01
    [group] = _specialized(labels, act, conf, beta, se, groups)
    assert (group.group, group.size, group.prototypes) == (0, 20, ("P-4",))
    act[rows_b[9], 4] = 0.0
    assert _specialized(labels, act, conf, beta, se, groups) == ()


def test_specialized_at_exactly_25_points_from_rates_of_uneven_binary_fractions():
    """The margin is *at least* 25 points: 30 of a group of 52 against 17 of the other 52
    of the class is exactly 13/52 = 1/4 apart (and Fisher p ≈ 0.009 < 0.01, rate in the
    group 58 % ≥ 50 %), so the prototype is specialized; the existing test's bar (40/40
    against 30/40) is exact in binary, these rates are not."""
    labels, act, conf, beta, se, groups = _base(n_per=104)
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:52]] = 0
    act[rows_b[:30], 4] = 1.0
    act[rows_b[52:69], 4] = 1.0
    assert 30 * 52 - 17 * 52 == 52 * 52 // 4  # 30/52 - 17/52 = 1/4 exactly
    assert stats.fisher_exact([[30, 22], [17, 35]], alternative="greater").pvalue < 0.01
    [group] = _specialized(labels, act, conf, beta, se, groups)
    assert group.prototypes == ("P-4",)


def test_specialized_needs_a_fisher_p_strictly_below_the_bar():
    """Fisher exact test p < specialized_p: a group of 5 whose prototype is active in all
    5 and in none of the other 15 has p = 1/C(20,5); with the bar set to exactly that p the
    prototype is not specialized, with the bar one step above it, it is."""
    labels, act, conf, beta, se, groups = _base()
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:5]] = 0
    act[rows_b[:5], 4] = 1.0
    p = stats.fisher_exact([[5, 0], [0, 15]], alternative="greater").pvalue
    assert p == pytest.approx(1 / math.comb(20, 5), rel=1e-9)
    assert _specialized(labels, act, conf, beta, se, groups, specialized_p=p) == ()
    [group] = _specialized(labels, act, conf, beta, se, groups, specialized_p=_above(p))
    assert group.prototypes == ("P-4",)


def test_specialized_group_of_exactly_the_minimum_size():
    """Sub-groups of at least min_group_size (5) samples are read: a group of exactly 5
    gets its specialized prototype, a group of 4 (with an equally clear one) does not."""
    labels, act, conf, beta, se, groups = _base()
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:5]] = 0
    act[rows_b[:5], 4] = 1.0
    [group] = _specialized(labels, act, conf, beta, se, groups)
    assert (group.group, group.size, group.prototypes) == (0, 5, ("P-4",))
    groups[rows_b[4]] = -1
    act[rows_b[4], 4] = 0.0
    assert 1 / math.comb(20, 4) < 0.01  # the test itself would still pass
    assert _specialized(labels, act, conf, beta, se, groups) == ()


# --------------------------------------------------------------------------- uncertain


def _swinging(leads, n_active_b=20):
    """P-3 active in all of a and in ``n_active_b`` of b's 20 samples, with accumulated
    leads of a over b of exactly ``leads`` standard errors (lead_se = 1)."""
    labels, act, conf, beta, se, groups = _base()
    act[labels == 0, 3] = 1.0
    act[np.flatnonzero(labels == 1)[:n_active_b], 3] = 1.0
    beta[:, 3, 0] = np.diff(np.concatenate([[0.0], leads]))
    lead_se = np.ones((T, K, M, M))
    return _run(labels, act, conf, beta, se, groups, lead_se=lead_se).uncertain


def test_uncertain_lead_of_exactly_plus_two_decides_the_first_class():
    """A prototype favours a when its lead is *at least* 2 standard errors: leads of
    +2, -3, +3, +3 are two swings (a, b, a); were +2 undecided, one swing would be left
    and the prototype would not be uncertain."""
    [u] = _swinging([2.0, -3.0, 3.0, 3.0])
    assert (u.id, u.classes, u.swings, u.checkpoints) == ("P-3", ("a", "b"), 2, (2, 3))
    assert u.favoured == ("a", "b", "a", "a")
    assert _swinging([2.0 - EPS, -3.0, 3.0, 3.0]) == ()


def test_uncertain_lead_of_exactly_minus_two_decides_the_second_class():
    """A prototype favours b when its lead is *at most* -2 standard errors: leads of
    +3, -2, +3, +3 are two swings (a, b, a); were -2 undecided there would be none."""
    [u] = _swinging([3.0, -2.0, 3.0, 3.0])
    assert (u.swings, u.checkpoints, u.favoured) == (2, (2, 3), ("a", "b", "a", "a"))
    assert _swinging([3.0, -2.0 + EPS, 3.0, 3.0]) == ()


def test_uncertain_needs_exactly_min_swings():
    """The default rule needs *at least* two changes of side: two are enough (a, b, a),
    one (a, then b for good) is not."""
    assert [u.swings for u in _swinging([3.0, -3.0, 3.0, 3.0])] == [2]
    assert _swinging([3.0, -3.0, -3.0, -3.0]) == ()


def test_uncertain_in_exactly_a_tenth_of_a_class():
    """The uncertain rule tests a pair when the prototype is active in *at least* 10 % of
    both classes: 2 of b's 20 samples (2/20 is the double 0.1) is enough, 1 of 20 is not."""
    [u] = _swinging([3.0, -3.0, 3.0, 3.0], n_active_b=2)
    assert u.classes == ("a", "b")
    assert _swinging([3.0, -3.0, 3.0, 3.0], n_active_b=1) == ()


# --------------------------------------------------------------------------- learning order


def test_pair_separated_at_exactly_95_percent_pairwise_accuracy():
    """A pair is separated from the checkpoint on which its pairwise accuracy stays *at
    least* 95 %: 38 of the 40 samples of a and b ranking their class strictly above the
    other (2/40 tied, and a tie is no win) separates a/b at checkpoint 2; 37 of 40 never."""
    labels, act, conf, beta, se, groups = _base()
    act[:, 0] = 1.0
    conf[2:] = 0.0
    for c in range(M):
        conf[2:, labels == c, c] = 1.0  # from checkpoint 2 on, every sample is right ...
    a = np.flatnonzero(labels == 0)
    conf[2:, a[:2], :2] = 0.5  # ... but for two of a, tied between a and b
    assert 38 / 40 == 1.0 - 0.05
    pairs = {p.pair: p for p in _run(labels, act, conf, beta, se, groups).learning_order.pairs}
    assert pairs[("a", "b")].final_pairwise_accuracy == 0.95
    assert pairs[("a", "b")].separated_at_checkpoint == 2
    assert pairs[("a", "b")].separated_at_step == 10
    conf[2:, a[2], :2] = 0.5  # a third tie: 37 of 40
    pairs = {p.pair: p for p in _run(labels, act, conf, beta, se, groups).learning_order.pairs}
    assert pairs[("a", "b")].separated_at_checkpoint is None
    assert pairs[("b", "c")].separated_at_checkpoint == 2


def test_pair_separated_on_a_level_that_rounds_above_its_count():
    """With separation_tolerance=0.18 the level is 82 %, but 1 - 0.18 is 0.8200000000000001
    in floats: 41 of the 50 samples of a and b ranking their class strictly above the other
    is exactly on the level and separates the pair; 40 of 50 does not."""
    assert 1.0 - 0.18 > 41 / 50
    labels, act, conf, beta, se, groups = _base(n_per=25)
    act[:, 0] = 1.0
    conf[2:] = 0.0
    for c in range(M):
        conf[2:, labels == c, c] = 1.0
    a = np.flatnonzero(labels == 0)
    conf[2:, a[:9], :2] = 0.5  # 9 ties: 41 of 50
    order = _run(labels, act, conf, beta, se, groups, separation_tolerance=0.18).learning_order
    pairs = {p.pair: p for p in order.pairs}
    assert pairs[("a", "b")].final_pairwise_accuracy == 0.82
    assert pairs[("a", "b")].separated_at_checkpoint == 2
    conf[2:, a[9], :2] = 0.5  # a tenth tie: 40 of 50
    order = _run(labels, act, conf, beta, se, groups, separation_tolerance=0.18).learning_order
    assert {p.pair: p for p in order.pairs}[("a", "b")].separated_at_checkpoint is None


# --------------------------------------------------------------------------- Step 4 and 5


def test_steady_means_every_class_moved_by_less_than_a_point():
    """A learning pattern is steady when no class's mean confidence moved by STEADY_CHANGE
    (0.01) or more: a gain or a loss of exactly 0.01 is not steady, one step less is."""
    assert STEADY_CHANGE == 0.01
    assert not is_steady(0.01, 0.0)
    assert not is_steady(0.0, -0.01)
    assert is_steady(_below(0.01), _above(-0.01))


def test_describe_groups_at_exactly_the_steady_bar():
    """In explanation.json: a group whose confidence in b rose by exactly min_change (0.25
    here, exact in binary) is not steady and credits its drivers; with the bar one step
    above its gain it is steady and credits none."""
    conf = np.full((2, 4, 2), 0.5)
    conf[1] = [0.25, 0.75]  # every sample: a -0.25, b +0.25
    groups, labels = np.zeros((1, 4), int), np.ones(4, int)
    fits = {(0, 0): (np.ones((2, 2)), np.full((2, 2), 9.0))}
    (moved,) = describe_groups(groups, labels, conf, fits=fits, min_change=0.25)
    assert (moved.steady, moved.gained, moved.drivers) == (False, (1, 0.25), ((0, 9.0), (1, 9.0)))
    (still,) = describe_groups(groups, labels, conf, fits=fits, min_change=_above(0.25))
    assert (still.steady, still.drivers) == (True, ())


def test_a_driver_at_exactly_the_z_threshold():
    """A learning pattern's drivers have z *at least* 2 (β > 0): z = 2 exactly is
    credited, one step below is not."""
    conf = np.full((2, 4, 2), 0.5)
    conf[1] = [0.25, 0.75]
    z = np.zeros((3, 2))
    z[:, 1] = [2.0, _below(2.0), 3.0]
    fits = {(0, 0): (np.ones((3, 2)), z)}
    (group,) = describe_groups(np.zeros((1, 4), int), np.ones(4, int), conf, fits=fits)
    assert group.drivers == ((2, 3.0), (0, 2.0))


def test_a_driver_changed_in_exactly_a_tenth_of_the_group():
    """A driver's intensity must have changed in *at least* a tenth of the group's samples
    (and five): 6 of a group of 60 is enough, 5 of 60 is not (the floor of five alone is
    pinned in test_patterns.py)."""
    n = 60
    conf = np.full((2, n, 2), 0.5)
    conf[1] = [0.25, 0.75]
    intensity = np.zeros((2, n, 2))
    intensity[1, :6, 0] = 1.0  # P-0 changed in 6 of 60
    intensity[1, :5, 1] = 1.0  # P-1 in 5 of 60
    fits = {(0, 0): (np.ones((2, 2)), np.full((2, 2), 9.0))}
    (group,) = describe_groups(np.zeros((1, n), int), np.ones(n, int), conf, fits=fits,
                               intensity=intensity)
    assert group.drivers == ((0, 9.0),)


def test_cluster_with_exactly_min_cluster_size_rows_runs_hdbscan():
    """``cluster`` returns all noise without HDBSCAN only for *fewer* rows than
    min_cluster_size: five tight rows at min_cluster_size 5 (a single cluster allowed) are
    one group; four rows are noise."""
    x = np.arange(5, dtype=np.float64)[:, None] * np.array([[1e-3, 0.0]])
    assert cluster(x, min_cluster_size=5, allow_single_cluster=True).tolist() == [0] * 5
    assert cluster(x[:4], min_cluster_size=5, allow_single_cluster=True).tolist() == [-1] * 4


def test_a_class_of_exactly_its_min_cluster_size_is_not_too_small():
    """``class_too_small`` flags a class with *fewer* samples than its minimum cluster
    size: with class_min_cluster_size 3, a class of 3 is clustered, a class of 2 is flagged."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1])
    pats = find_patterns(rng.dirichlet(np.ones(2), size=(2, 5)), labels,
                         class_min_cluster_size=3)
    assert pats.class_min_cluster_size.tolist() == [3, 3]
    assert pats.class_too_small.tolist() == [False, True]


def test_group_fit_of_exactly_the_minimum_group_size():
    """Step 5 fits every HDBSCAN group of *at least* min_group_size (10) samples: a group
    of 10 is fitted, a group of 9 is skipped and counted."""
    rng = np.random.default_rng(0)
    groups = np.array([[0] * 10 + [1] * 9 + [-1] * 5])
    dp = rng.normal(size=(1, 24, 2))
    dy = rng.normal(size=(1, 24, 2))
    mp = fit_mapping(dp, dy, groups=groups, lam=1.0, standard_errors="none")
    assert sorted(mp.group_betas) == [(0, 0)]
    assert mp.group_fit(0, 0).n == 10
    assert mp.skipped_groups == ((0, 1, 9),)


def test_ridge_needs_exactly_two_samples_for_cross_validation():
    """Leave-one-out λ needs at least 2 samples, a fixed λ at least 1: 2 and 1 are fitted,
    1 and 0 are one-line errors."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 1)), rng.normal(size=(2, 1))
    assert ridge_fit(x, y).n == 2
    assert ridge_fit(x[:1], y[:1], lam=1.0).n == 1
    with pytest.raises(WhylookError, match="ridge needs at least 2 samples, got 1"):
        ridge_fit(x[:1], y[:1])
    with pytest.raises(WhylookError, match="ridge needs at least 1 samples, got 0"):
        ridge_fit(x[:0], y[:0], lam=1.0)


# --------------------------------------------------------------------------- wording


@pytest.mark.parametrize(("n_classes", "correct", "n"), [(3, 4, 10), (10, 19, 100)])
def test_no_near_chance_caution_at_exactly_a_tenth_of_the_way(n_classes, correct, n):
    """The caution is for an accuracy *less than* a tenth of the way from chance to
    perfect, (9 + M) / (10 M): 4 of 10 with 3 classes and 19 of 100 with 10 are exactly on
    the bar (no caution), one sample fewer is below it. (The summary's test and the
    doctest hit the same two bars; this pins the function on counts.)"""
    assert correct * 10 * n_classes == (9 + n_classes) * n
    assert near_chance_caution(correct / n, n_classes) is None
    assert near_chance_caution((correct - 1) / n, n_classes) is not None


@pytest.mark.parametrize(("n_classes", "correct", "n"),
                         [(8, 17, 80), (20, 29, 200), (7, 8, 35), (11, 2, 11)])
def test_no_near_chance_caution_on_the_bar_whatever_the_class_count(n_classes, correct, n):
    """17 of 80 with 8 classes (21.25 %), 29 of 200 with 20, 8 of 35 with 7 and 2 of 11 with
    11 are exactly a tenth of the way from chance to perfect: not less, so no caution,
    whether the accuracy is the exact k/n (the report recomputes it) or as explanation.json
    stores it, to 6 decimals (the summary reads that: 8/35 is stored 4e-7 below the bar);
    one sample fewer is cautioned either way."""
    assert correct * 10 * n_classes == (9 + n_classes) * n
    for accuracy in (correct / n, round(correct / n, 6)):
        assert near_chance_caution(accuracy, n_classes) is None
    for accuracy in ((correct - 1) / n, round((correct - 1) / n, 6)):
        assert near_chance_caution(accuracy, n_classes) is not None


def test_floor_pct_prints_the_whole_percentage_below_every_count_ratio():
    """``floor_pct`` rounds down, so a rate under a bar never prints as the bar: for every
    ratio k/n of up to 400 samples it prints floor(100 k / n), computed in integers (the
    double 29/100 times 100 is 28.999..., which must still print as 29 %)."""
    wrong = [(k, n) for n in range(1, 401) for k in range(n + 1)
             if floor_pct(k / n) != f"{100 * k // n}%"]
    assert wrong == []


def _summary(tmp_path: Path, **fields) -> list[str]:
    from whylook.explain import Explanation

    return Explanation(path=tmp_path, data=summary_data(**fields),
                       arrays={}).summary().splitlines()


def test_summary_lists_up_to_exactly_ten_uncertain_entries(tmp_path):
    """The summary lists 10 uncertain entries and counts the rest: exactly 10 are all
    listed with no "more" line, 11 leave one out and say so."""
    def entries(count):
        return [{"id": f"P-{i}", "classes": ["a", "b"], "swings": 2, "steps": [1, 2]}
                for i in range(count)]

    ten = _summary(tmp_path, uncertain_prototypes=entries(10))
    assert sum(line.startswith("  P-") for line in ten) == 10
    assert not any("more entries" in line for line in ten)
    eleven = _summary(tmp_path, uncertain_prototypes=entries(11))
    assert sum(line.startswith("  P-") for line in eleven) == 10
    assert "  ... 1 more entries in explanation.json and the report" in eleven


def test_summary_names_up_to_exactly_ten_separated_pairs(tmp_path):
    """Up to 10 separated pairs the learning order names them all, first to last; from 11
    on, the first five and the last five."""
    def order(count):
        return [{"pair": [f"c{i}", f"c{i + 1}"], "separated_at_step": i} for i in range(count)]

    [ten] = [x for x in _summary(tmp_path, learning_order=order(10)) if "Learning order" in x]
    assert ten == ("Learning order: separated c0/c1, c1/c2, c2/c3, c3/c4, c4/c5, c5/c6, "
                   "c6/c7, c7/c8, c8/c9, c9/c10 (first to last)")
    [eleven] = [x for x in _summary(tmp_path, learning_order=order(11)) if "Learning order" in x]
    assert eleven.startswith("Learning order: first separated c0/c1, c1/c2, c2/c3, c3/c4, "
                             "c4/c5; last ")


# --------------------------------------------------------------------------- the report


def test_beta_heatmap_notes_blank_from_five_percent_and_dots_from_z_two(monkeypatch):
    """A transition's label gives its blank share from exactly 5 % on (1 of 20; 4 of 81
    is below), as the whole percentage below it (29 of 100 reads 29 %, though 100 x 0.29 is
    28.999999999999996 in floats); a cell gets its dot from |z| = 2 exactly, either sign."""
    from whylook.report import figures

    drawn = []
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.append(fig) or b"")
    z = np.array([[2.0, -2.0, _below(2.0)], [-_below(2.0), 0.0, 3.0]])
    blank = np.array([1 / 20, 4 / 81, 29 / 100])
    figures.beta_heatmap(np.zeros((2, 3)), ["P-0", "P-1"], [10, 20, 30], "a", z=z, blank=blank)
    (fig,) = drawn
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "→10 (5% blank)", "→20", "→30 (29% blank)"]
    assert ax.get_xlabel().startswith("transition (ends at step); blank: ")
    dots = {(int(x), int(y)) for x, y in ax.collections[0].get_offsets()}
    assert dots == {(0, 0), (1, 0), (2, 1)}  # (transition, row)
