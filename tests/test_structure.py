"""Step 6 rules on hand-made arrays whose right answer is known."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from _synthetic_run import summary_data
from whylook.errors import WhylookError
from whylook.structure import StructureSettings, accumulated_lead, assemble, pairwise_accuracy

M, K, T = 3, 5, 4
N_PER = 20


def _base():
    n = M * N_PER
    labels = np.repeat(np.arange(M), N_PER)
    mass = np.full((n, K), 0.01)
    conf = np.full((T + 1, n, M), 1.0 / M)
    beta = np.zeros((T, K, M))
    se = np.full((T, K, M), 0.1)
    groups = -np.ones(n, dtype=np.int16)
    return labels, mass, conf, beta, se, groups


def _run(labels, mass, conf, beta, se, groups, zero_maps=None, lead_se=None, **kw):
    kw.setdefault("active_threshold", 0.1)
    return assemble(
        classes=["a", "b", "c"],
        steps=[0, 1, 10, 100, 1000],
        labels=labels,
        activity=mass,
        confidence=conf,
        beta=beta,
        beta_se=se,
        class_groups=groups,
        settings=StructureSettings(**kw),
        zero_maps=zero_maps,
        lead_se=lead_se,
    )


def _one_class_summary(why_no_shared: dict, spearman: float | None = None,
                       p_value: float | None = None) -> str:
    """The summary of a one-class explanation.json whose class has no shared prototypes."""
    from whylook.explain import Explanation

    return Explanation(path=Path("."), data={
        "classes": ["a"], "k": K, "layer": "l", "grid": [2, 2], "checkpoints": [{}] * 3,
        "settings": {"analysis_size": 9},
        "classes_explained": [{"class": "a", "shared": [], "specialized": [],
                               "why_no_shared": why_no_shared}],
        "uncertain_prototypes": [], "learning_order": [{"pair": ["a", "a"]}],
        "learning_order_correlation": {"spearman": spearman, "p_value": p_value, "n_pairs": 1},
    }, arrays={}).summary()


def test_shared_needs_activity_and_significant_support():
    labels, mass, conf, beta, se, groups = _base()
    in_a = labels == 0
    mass[in_a, 0] = 0.5  # P-0: active in every sample of a, positive support
    mass[in_a, 1] = 0.4  # P-1: active in every sample of a, but beta only noise
    mass[np.flatnonzero(in_a)[:15], 2] = 0.3  # P-2: active in 75% of a, weaker real support
    beta[:, 0, 0] = 1.0
    beta[:, 1, 0] = 0.05
    beta[:, 2, 0] = 0.4
    s = _run(labels, mass, conf, beta, se, groups)
    a = s.classes[0]
    assert a.shared == ("P-0", "P-2")  # strongest first, P-1 is below the noise
    assert a.shared_strength[0] == pytest.approx(1.0)
    # strength = active rate (0.75 vs 1.0) x summed support (4 x 0.4 vs 4 x 1.0)
    assert a.shared_strength[1] == pytest.approx(0.75 * 1.6 / 4.0)
    assert s.active_rate_by_class[2, 0] == pytest.approx(0.75)
    assert s.classes[1].shared == ()
    assert s.active_rate_by_class[0, 0] == pytest.approx(1.0)
    assert s.active_rate_by_class[0, 1] == pytest.approx(0.0)
    # z of the summed support: 4 * 1.0 / sqrt(4 * 0.1^2) = 20
    assert s.support_z[0, 0] == pytest.approx(20.0)


def test_a_class_without_shared_prototypes_says_which_half_of_the_rule_fails():
    """9's case on full MNIST: the part most samples are looked at through has no support
    (it is shared with other classes); the part that has support is looked at in few."""
    from whylook.structure import Candidate

    labels, mass, conf, beta, se, groups = _base()
    in_a = np.flatnonzero(labels == 0)
    mass[in_a, 0] = 0.5  # looked at in every sample of a, negative support
    mass[labels == 1, 0] = 0.5  # ... and of b: a part the two share
    mass[in_a[:15], 3] = 0.4  # looked at in 75% of a, support only noise
    mass[in_a[:4], 1] = 0.3  # looked at in 20% of a, clear support
    mass[in_a[:2], 2] = 0.3  # 10%, clearer support: the less looked-at of the two
    beta[:, 0, 0] = -0.5
    beta[:, 3, 0] = 0.05
    beta[:, 1, 0] = 0.5
    beta[:, 2, 0] = 0.9
    s = _run(labels, mass, conf, beta, se, groups)
    a = s.classes[0]
    assert a.shared == ()
    why = a.why_no_shared
    # z = 4 beta / sqrt(4 * 0.1^2) = 20 beta
    assert why.most_active == (Candidate("P-0", 1.0, pytest.approx(-10.0), ("b",)),
                               Candidate("P-3", 0.75, pytest.approx(1.0)))
    assert why.best_supported == Candidate("P-1", 0.2, pytest.approx(10.0))
    # A class with shared prototypes carries no diagnosis.
    mass[in_a, 1] = 0.3
    assert _run(labels, mass, conf, beta, se, groups).classes[0].why_no_shared is None
    assert why.activity_met
    # Nothing passes either half: the most looked-at stand in, no supported one.
    beta[:] = 0.0
    mass[:] = 0.01
    mass[in_a[:3], 4] = 0.2
    no_support = _run(labels, mass, conf, beta, se, groups)
    why = no_support.classes[0].why_no_shared
    assert why.most_active[0].id == "P-4"
    assert not why.activity_met
    assert why.best_supported is None

    data = s.to_json()["classes_explained"][0]["why_no_shared"]
    assert data["most_active"][0] == {"id": "P-0", "active_rate": 1.0, "support_z": -10.0,
                                      "also_active_in": ["b"]}
    assert data["best_supported"] == {"id": "P-1", "active_rate": 0.2, "support_z": 10.0,
                                      "also_active_in": []}
    line = _one_class_summary(data)
    assert ("a: none: most looked-at P-0 (100%, z -10.0; also most of b), P-3 (75%, z +1.0) "
            "lack support; "
            "the most looked-at with support, P-1 (z +10.0), is looked at in 20%") in line
    # Where nothing is looked at in most samples, the line says so instead.
    data = no_support.to_json()["classes_explained"][0]["why_no_shared"]
    assert data["activity_met"] is False
    line = _one_class_summary(data)
    assert ("a: none: no prototype is looked at in most of its samples (most: P-4 (15%, "
            "z +0.0)") in line
    assert "no prototype's support clears noise" in line


def test_presence_without_saliency_mass_is_not_active():
    labels, mass, conf, beta, se, groups = _base()
    mass[:, 3] = 0.09  # just below the default threshold of 0.1 everywhere
    beta[:, 3, :] = 1.0
    s = _run(labels, mass, conf, beta, se, groups)
    assert not s.active[:, 3].any()
    assert all("P-3" not in c.shared for c in s.classes)


def test_specialized_prototype_of_a_sub_group():
    labels, mass, conf, beta, se, groups = _base()
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:12]] = 0
    groups[rows_b[12:]] = 1
    mass[rows_b[:12], 4] = 0.6  # P-4 only in group 0 of class b
    mass[rows_b, 0] = 0.3  # P-0 in all of b: not specialized
    s = _run(labels, mass, conf, beta, se, groups)
    spec = s.classes[1].specialized
    assert len(spec) == 1
    assert spec[0].group == 0
    assert spec[0].size == 12
    assert spec[0].prototypes == ("P-4",)
    # Examples: the group's first 8 samples, in row order (not just any rows of b).
    assert spec[0].samples == tuple(rows_b[:8].tolist())


def test_specialized_needs_both_the_margin_and_a_significant_difference():
    labels, mass, conf, beta, se, groups = _base()
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:5]] = 0
    mass[rows_b[:5], 4] = 0.6  # in all 5 of the group ...
    mass[rows_b[5:12], 4] = 0.6  # ... and 7 of the other 15: margin 0.53, Fisher p 0.051
    assert _run(labels, mass, conf, beta, se, groups).classes[1].specialized == ()
    assert _run(labels, mass, conf, beta, se, groups,
                specialized_p=0.06).classes[1].specialized[0].prototypes == ("P-4",)
    # 40 of 40 in the group against 30 of 40 in the rest: Fisher p 5e-4, margin only 0.25.
    labels = np.repeat(np.arange(M), 80)
    rows_b = np.flatnonzero(labels == 1)
    mass = np.full((labels.size, K), 0.01)
    conf = np.full((T + 1, labels.size, M), 1.0 / M)
    groups = -np.ones(labels.size, dtype=np.int16)
    groups[rows_b[:40]] = 0
    mass[rows_b[:70], 4] = 0.6
    assert _run(labels, mass, conf, beta, se, groups,
                specialized_margin=0.25).classes[1].specialized[0].prototypes == ("P-4",)
    assert _run(labels, mass, conf, beta, se, groups,
                specialized_margin=0.26).classes[1].specialized == ()


def test_specialized_needs_a_large_enough_group():
    labels, mass, conf, beta, se, groups = _base()
    rows_b = np.flatnonzero(labels == 1)
    groups[rows_b[:3]] = 0
    mass[rows_b[:3], 4] = 0.6
    s = _run(labels, mass, conf, beta, se, groups)
    assert s.classes[1].specialized == ()


def test_uncertain_prototype_swings_beyond_noise_only():
    labels, mass, conf, beta, se, groups = _base()
    both = (labels == 0) | (labels == 1)
    mass[both, 3] = 0.3
    # The accumulated lead of a over b is +2, -2, +2, -2: P-3 favours a, then b, then a,
    # then b, three swings, seen at checkpoints 2, 3 and 4.
    beta[:, 3, 0] = [1.0, -2.0, 2.0, -2.0]
    beta[:, 3, 1] = [-1.0, 2.0, -2.0, 2.0]
    s = _run(labels, mass, conf, beta, se, groups)
    assert len(s.uncertain) == 1
    u = s.uncertain[0]
    assert (u.id, u.classes, u.swings) == ("P-3", ("a", "b"), 3)
    assert u.checkpoints == (2, 3, 4)
    assert u.steps == (10, 100, 1000)
    # Per-transition flips whose accumulated lead never changes side are not swings.
    beta_steady = beta.copy()
    beta_steady[:, 3, 0] = [1.0, -1.0, 1.0, -1.0]
    beta_steady[:, 3, 1] = [-1.0, 1.0, -1.0, 1.0]
    assert _run(labels, mass, conf, beta_steady, se, groups).uncertain == ()
    # The same pattern inside the noise is not a swing.
    se_noisy = np.full_like(se, 5.0)
    assert _run(labels, mass, conf, beta, se_noisy, groups).uncertain == ()
    # One change of side only (a, then b for good): uncertain under min_swings=1 alone.
    beta_once = beta.copy()
    beta_once[:, 3, 0] = [1.0, -2.0, 0.0, 0.0]
    beta_once[:, 3, 1] = [-1.0, 2.0, 0.0, 0.0]
    assert _run(labels, mass, conf, beta_once, se, groups).uncertain == ()
    once = _run(labels, mass, conf, beta_once, se, groups, min_swings=1).uncertain
    assert [(u.id, u.swings, u.checkpoints) for u in once] == [("P-3", 1, (2,))]


def test_uncertain_reads_the_standard_error_of_the_lead_itself():
    """Given the leads' own standard errors (Mapping.lead_se, which count how the two
    classes' coefficients co-vary), the swings are decided on those, not on the two
    coefficients' errors in quadrature; the JSON keeps the lead it was decided on."""
    labels, mass, conf, beta, se, groups = _base()
    both = (labels == 0) | (labels == 1)
    mass[both, 3] = 0.3
    beta[:, 3, 0] = [1.0, -2.0, 2.0, -2.0]
    beta[:, 3, 1] = [-1.0, 2.0, -2.0, 2.0]
    quadrature = np.sqrt(np.cumsum(se[:, :, :, None] ** 2 + se[:, :, None, :] ** 2, axis=0))
    same = _run(labels, mass, conf, beta, se, groups, lead_se=quadrature).uncertain
    assert [(u.id, u.swings) for u in same] == [("P-3", 3)]
    expected = np.cumsum(beta[:, 3, 0] - beta[:, 3, 1]) / quadrature[:, 3, 0, 1]
    np.testing.assert_allclose(same[0].lead_z, expected)
    entry = _run(labels, mass, conf, beta, se, groups,
                 lead_se=quadrature).to_json()["uncertain_prototypes"][0]
    assert entry["lead_z"] == [round(float(z), 4) for z in expected]
    # Anti-correlated errors (what one class gains the other loses) make the lead's error
    # larger than the quadrature: here 14 times, and the same betas are inside the noise.
    assert _run(labels, mass, conf, beta, se, groups, lead_se=14 * quadrature).uncertain == ()
    # Positively correlated errors make it smaller: a swing the quadrature calls noise is
    # real. Leads of 0.2 are 0.7-1.4 quadrature errors, but 2 of the lead's own.
    small = beta / 10
    assert _run(labels, mass, conf, small, se, groups).uncertain == ()
    tight = _run(labels, mass, conf, small, se, groups, lead_se=np.full_like(quadrature, 0.1))
    assert [(u.id, u.swings) for u in tight.uncertain] == [("P-3", 3)]
    with pytest.raises(WhylookError, match="lead_se must have shape"):
        _run(labels, mass, conf, beta, se, groups, lead_se=quadrature[:, :, :, :2])


def test_uncertain_needs_the_prototype_in_both_classes():
    labels, mass, conf, beta, se, groups = _base()
    mass[labels == 0, 3] = 0.3  # only in class a
    beta[:, 3, 0] = [1.0, -2.0, 2.0, -2.0]
    beta[:, 3, 1] = [-1.0, 2.0, -2.0, 2.0]
    assert _run(labels, mass, conf, beta, se, groups).uncertain == ()


def _confident(conf, rows, t_from, true, other=None):
    """From checkpoint t_from on, rows score their true class above everything else."""
    conf[t_from:, rows, :] = 0.1
    conf[t_from:, rows, true] = 0.8


def test_learning_order_reads_pairwise_accuracy_not_raw_confusion():
    labels, mass, conf, beta, se, groups = _base()
    # At initialisation every sample is predicted as "c": raw confusion of (a, b) is zero,
    # but the pair is not yet told apart, so it must not count as separated at step 0.
    conf[0, :, :] = [0.3, 0.3, 0.4]
    conf[1:, :, :] = [0.3, 0.3, 0.4]
    _confident(conf, labels == 0, 2, 0)
    _confident(conf, labels == 2, 2, 2)
    _confident(conf, labels == 1, 4, 1)
    mass[labels == 0, 0] = 0.9
    mass[labels == 1, 1] = 0.9
    mass[labels == 2, 2] = 0.9
    s = _run(labels, mass, conf, beta, se, groups)
    by_pair = {p.pair: p for p in s.learning_order.pairs}
    assert by_pair[("a", "c")].separated_at_checkpoint == 2
    assert by_pair[("a", "c")].separated_at_step == 10
    assert by_pair[("a", "b")].separated_at_checkpoint == 4
    assert by_pair[("b", "c")].separated_at_checkpoint == 4
    assert s.learning_order.pairs[0].pair == ("a", "c")  # first separated comes first
    # Separated together, the more distinct pair comes first: a also looks at P-1, b's
    # part, so a/b is less distinct than b/c, against the order of the names.
    mass[labels == 0, 1] = 0.9
    s = _run(labels, mass, conf, beta, se, groups)
    by_pair = {p.pair: p for p in s.learning_order.pairs}
    assert by_pair[("b", "c")].distinctness > by_pair[("a", "b")].distinctness
    assert [p.pair for p in s.learning_order.pairs] == [("a", "c"), ("b", "c"), ("a", "b")]


def test_never_separated_pair_has_no_step():
    labels, mass, conf, beta, se, groups = _base()
    s = _run(labels, mass, conf, beta, se, groups)  # uniform confidences throughout
    assert all(p.separated_at_step is None for p in s.learning_order.pairs)


def test_learning_order_correlation_matches_scipy():
    rng = np.random.default_rng(1)
    m, n_per, t1 = 5, 30, 6
    labels = np.repeat(np.arange(m), n_per)
    n = len(labels)
    conf = np.full((t1, n, m), 1.0 / m)
    # Class c becomes confident at checkpoint c+1: pairs (a, b) separate at max(a, b)+1.
    for c in range(m):
        conf[c + 1 :, labels == c, :] = 0.05
        conf[c + 1 :, labels == c, c] = 0.8
    mass = rng.dirichlet(np.ones(8), n)
    s = assemble(
        classes=[str(c) for c in range(m)],
        steps=list(range(t1)),
        labels=labels,
        activity=mass,
        confidence=conf,
        beta=np.zeros((t1 - 1, 8, m)),
        beta_se=np.ones((t1 - 1, 8, m)),
        class_groups=-np.ones(n, dtype=np.int16),
    )
    pairs = s.learning_order.pairs
    when = [
        p.separated_at_checkpoint if p.separated_at_checkpoint is not None else t1 for p in pairs
    ]
    expected = stats.spearmanr([p.distinctness for p in pairs], when)
    assert s.learning_order.spearman == pytest.approx(expected.statistic)
    assert s.learning_order.p_value == pytest.approx(expected.pvalue)
    # Class 4 never becomes confident before the last checkpoint... it does at 5 = last.
    assert {p.pair: p.separated_at_checkpoint for p in pairs}[("0", "1")] == 2


def test_pairwise_accuracy_closed_form():
    labels = np.array([0, 0, 1, 1, 2])
    conf = np.array(
        [[[0.6, 0.4, 0.0], [0.4, 0.6, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.0, 0.0, 1.0]]]
    )
    # Rows 0 and 2 are right within the pair (0, 1); rows 1 and 3 are wrong.
    assert pairwise_accuracy(conf, labels, 0, 1).tolist() == [0.5]


def test_many_classes_match_the_rules_pair_by_pair():
    # 12 classes (66 pairs), prototypes active in several classes, noisy leads and
    # accuracies: every pair's learning order and uncertain verdict, read one at a time.
    rng = np.random.default_rng(5)
    m, k, t1, n_per = 12, 6, 12, 15
    labels = np.repeat(np.arange(m), n_per)
    n = labels.size
    conf = rng.dirichlet(np.ones(m) * 0.5, size=(t1, n))
    for t in range(t1):  # classes grow confident one after another, with stragglers
        sure = (labels < t * 1.5) & (rng.random(n) < 0.97)
        conf[t, sure] = 0.02
        conf[t, sure, labels[sure]] = 1.0 - 0.02 * (m - 1)
    activity = rng.dirichlet(np.ones(k) * 0.3, n)
    beta = rng.normal(0, 1.0, (t1 - 1, k, m))
    lead_se = rng.uniform(0.2, 0.8, (t1 - 1, k, m, m))
    lead_se = (lead_se + lead_se.transpose(0, 1, 3, 2)) / 2
    steps = [10 * t for t in range(t1)]
    classes = [f"c{c}" for c in range(m)]
    settings = StructureSettings(active_threshold=0.3, uncertain_min_rate=0.1)
    s = assemble(classes=classes, steps=steps, labels=labels, activity=activity,
                 confidence=conf, beta=beta, beta_se=np.ones_like(beta),
                 class_groups=-np.ones(n, dtype=np.int16), settings=settings,
                 lead_se=lead_se)

    by_pair = {p.pair: p for p in s.learning_order.pairs}
    assert len(by_pair) == m * (m - 1) // 2
    level = 1.0 - settings.separation_tolerance
    profiles = [activity[labels == c].mean(axis=0) for c in range(m)]
    for a in range(m):
        for b in range(a + 1, m):
            acc = pairwise_accuracy(conf, labels, a, b)
            below = np.flatnonzero(acc < level)
            at = 0 if below.size == 0 else None if below[-1] == t1 - 1 else below[-1] + 1
            got = by_pair[(classes[a], classes[b])]
            assert got.separated_at_checkpoint == at
            assert got.final_pairwise_accuracy == acc[-1]
            assert got.distinctness == pytest.approx(
                jensenshannon(profiles[a], profiles[b], base=2), abs=1e-12)
    assert len({p.separated_at_checkpoint for p in by_pair.values()}) >= 4

    active = np.asarray(s.active_rate_by_class)
    expected = []
    for p in range(k):
        used = np.flatnonzero(active[p] >= settings.uncertain_min_rate)
        for i, a in enumerate(used):
            for b in used[i + 1:]:
                z = accumulated_lead(beta, None, p, a, b, lead_se=lead_se)
                side = np.where(z >= settings.z_threshold, 1,
                                np.where(z <= -settings.z_threshold, -1, 0))
                decided = side[side != 0]
                swings = int((decided[1:] != decided[:-1]).sum())
                if swings >= settings.min_swings:
                    expected.append((f"P-{p}", (classes[a], classes[b]), swings,
                                     tuple(float(v) for v in z)))
    got = [(u.id, u.classes, u.swings, u.lead_z) for u in s.uncertain]
    assert sorted(got) == sorted(expected)
    assert len(expected) >= 5
    # Listed most swings first, then by prototype number, then by the pair.
    assert got == sorted(expected, key=lambda e: (-e[2], int(e[0][2:]), e[1]))
    assert len({e[2] for e in expected}) >= 2

    # The flagged pairs' confusion against the average pair's, counted sample by sample.
    wrong = np.zeros((m, m))
    for t in range(1, t1):
        for i in range(n):
            wrong[labels[i], conf[t, i].argmax()] += 1
    pairs = {tuple(sorted((int(u.classes[0][1:]), int(u.classes[1][1:])))) for u in s.uncertain}
    flagged = np.mean([wrong[a, b] + wrong[b, a] for a, b in pairs])
    average = np.mean([wrong[a, b] + wrong[b, a] for a in range(m) for b in range(a + 1, m)])
    check = s.uncertain_confusion
    assert check.flagged_pairs == len(pairs)
    assert check.flagged_mean == pytest.approx(flagged)
    assert check.all_pairs_mean == pytest.approx(average)
    assert check.lift == pytest.approx(flagged / average)
    assert s.to_json()["uncertain_pairs_confusion"]["lift"] == pytest.approx(flagged / average)


def test_a_class_never_looked_at_has_no_distinctness_and_no_warning():
    labels, mass, conf, beta, se, groups = _base()
    mass[labels == 1] = 0.0  # every Grad-CAM map of class b blank
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = _run(labels, mass, conf, beta, se, groups)
    by_pair = {p.pair: p.distinctness for p in s.learning_order.pairs}
    assert by_pair[("a", "b")] == 0.0
    assert by_pair[("b", "c")] == 0.0
    assert by_pair[("a", "c")] == 0.0  # same uniform profile: nothing tells them apart
    mass[labels == 2, 3] = 0.5
    s = _run(labels, mass, conf, beta, se, groups)
    assert {p.pair: p.distinctness for p in s.learning_order.pairs}[("a", "c")] > 0.1


def test_bad_shapes_and_settings_are_one_line_errors():
    labels, mass, conf, beta, se, groups = _base()
    with pytest.raises(WhylookError, match="beta and beta_se"):
        _run(labels, mass, conf, beta[:2], se, groups)
    with pytest.raises(WhylookError, match="labels"):
        _run(labels[:-1], mass, conf, beta, se, groups)
    with pytest.raises(WhylookError, match="active_threshold"):
        StructureSettings(active_threshold=1.5)
    # Types and NaN: a string would fail deep inside, NaN or inf only when the JSON is written.
    for bad, message in (({"z_threshold": float("nan")}, "z_threshold must be a finite number"),
                         ({"z_threshold": float("inf")}, "z_threshold must be a finite number"),
                         ({"shared_rate": "0.5"}, "shared_rate must be a finite number"),
                         ({"min_swings": "2"}, "min_swings must be a whole number"),
                         ({"min_swings": 2.5}, "min_swings must be a whole number, not 2.5"),
                         ({"min_group_size": True}, "min_group_size must be a whole number")):
        with pytest.raises(WhylookError, match=message):
            StructureSettings(**bad)
    numpy_values = StructureSettings(z_threshold=np.float32(2.5), min_swings=np.int64(3))
    assert type(numpy_values.z_threshold) is float
    assert type(numpy_values.min_swings) is int
    empty = labels.copy()
    empty[empty == 2] = 1
    with pytest.raises(WhylookError, match="no samples"):
        _run(empty, mass, conf, beta, se, groups)


def test_cli_min_swings_loosens_the_uncertain_rule(
    tmp_path: Path, tmp_path_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    """``whylook explain --min-swings 1`` flags every (prototype, pair) that the default
    rule flags (and on data with single swings more: see the test above); the setting is
    recorded; 0 is refused in one line."""
    from _tiny_run import baseline, copy_run, explain_argv
    from whylook.cli import main

    _, reference = baseline(tmp_path_factory)
    default = json.loads((reference / "analysis" / "explanation.json").read_text())
    run = copy_run(reference, tmp_path / "run")
    assert main(explain_argv(run, "--min-swings", "1")) == 0
    loose = json.loads((run / "analysis" / "explanation.json").read_text())
    assert loose["structure_settings"]["min_swings"] == 1
    assert default["structure_settings"]["min_swings"] == 2

    def flagged(exp: dict) -> set[tuple[str, tuple[str, ...]]]:
        return {(u["id"], tuple(u["classes"])) for u in exp["uncertain_prototypes"]}

    assert flagged(default) <= flagged(loose)
    capsys.readouterr()
    assert main(explain_argv(run, "--min-swings", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: min_swings must be at least 1 and min_group_size at least 2"]


def test_cli_support_reads_the_named_fits(tmp_path: Path, tmp_path_factory) -> None:
    """``--support global`` reads the global fit alone at z >= 2 (and computes no
    class-conditional fit); the default reads both against 2.28. (A bad name:
    tests/test_bad_inputs.py.)"""
    from _tiny_run import baseline, copy_run, explain_argv
    from whylook.cli import main
    from whylook.explain import load_explanation

    _, reference = baseline(tmp_path_factory)
    both = load_explanation(reference)
    assert both.data["settings"]["support"] == "global+class"
    assert both.data["settings"]["support_threshold"] == pytest.approx(2.278, abs=1e-3)
    assert both.arrays["support_z_by_fit"].shape[0] == 2
    run = copy_run(reference, tmp_path / "run")
    assert main(explain_argv(run, "--support", "global")) == 0
    alone = load_explanation(run)
    assert alone.data["settings"]["support"] == "global"
    assert alone.data["settings"]["support_threshold"] == 2.0
    assert "beta_class" not in alone.arrays
    np.testing.assert_array_equal(alone.arrays["support_z_by_fit"][0],
                                  both.arrays["support_z_by_fit"][0])
    np.testing.assert_array_equal(alone.arrays["support_z"], alone.arrays["support_z_by_fit"][0])


def test_cli_batch_size_reaches_every_pass(
    tmp_path: Path, tmp_path_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--batch-size`` sets the Grad-CAM batches (for memory); the maps stay the same."""
    from _tiny_run import baseline, copy_run, explain_argv
    from whylook.cli import main
    from whylook.explain import load_explanation
    from whylook.saliency import GradCAM

    seen: list[int] = []
    original = GradCAM._batches

    def spy(self, images, labels, batch_size, *args):  # type: ignore[no-untyped-def]
        seen.append(batch_size)
        return original(self, images, labels, batch_size, *args)

    _, reference = baseline(tmp_path_factory)  # may explain the reference run first
    monkeypatch.setattr(GradCAM, "_batches", spy)
    run = copy_run(reference, tmp_path / "run")  # no cache: every pass runs
    assert main(explain_argv(run, "--batch-size", "7")) == 0
    assert seen
    assert set(seen) == {7}
    assert load_explanation(run).data["settings"]["batch_size"] == 7
    assert load_explanation(reference).data["settings"]["batch_size"] == 256
    np.testing.assert_allclose(load_explanation(run).arrays["saliency"],
                               load_explanation(reference).arrays["saliency"],
                               rtol=1e-5, atol=1e-7)


def test_summary_of_many_classes_lists_those_in_the_most_uncertain_entries(tmp_path):
    from whylook.explain import Explanation

    names = [f"c{i:02d}" for i in range(45)]
    unc = [{"id": "P-1", "classes": pair, "swings": 2, "steps": [1, 2]}
           for pair in (["c40", "c44"], ["c44", "c03"], ["c44", "c41"], ["c41", "c40"])]
    data = summary_data(
        classes=names, uncertain_prototypes=unc,
        classes_explained=[{"class": c, "shared": ["P-0"], "specialized": [],
                            "learning_unseen": 0.5} for c in names])
    data["classes_explained"][44]["why_no_shared"] = None
    data["classes_explained"][44]["shared"] = []
    text = Explanation(path=tmp_path, data=data, arrays={}).summary()
    listed = [line.split(":")[0].strip() for line in text.splitlines()
              if line.startswith("  ") and line.split(":")[0].strip() in names]
    # In most entries first (c44: 3; c40, c41: 2; c03: 1), then the first classes; in
    # class order.
    want = sorted(["c44", "c40", "c41", "c03", *[f"c{i:02d}" for i in range(27) if i != 3]])
    assert listed == want
    assert "  ... 15 more classes in explanation.json and the report (listed: those in the " \
           "most uncertain entries)" in text
    assert ("Learning unseen (Grad-CAM all zero): c00 (50%), c01 (50%), c02 (50%), c03 (50%), "
            "c04 (50%), c05 (50%), c06 (50%), c07 (50%), c08 (50%), c09 (50%) (+35 more) of "
            "the class's learning") in text
    # 30 classes or fewer: every one, as before.
    data["classes_explained"] = data["classes_explained"][:30]
    text = Explanation(path=tmp_path, data=data, arrays={}).summary()
    assert "more classes" not in text
    assert sum(line.split(":")[0].strip() in names for line in text.splitlines()) == 30


def test_summary_cautions_when_the_final_model_is_near_chance(tmp_path):
    from whylook.explain import Explanation

    def caution(accuracy):
        data = summary_data(checkpoints=[{}, {}, {"analysis_accuracy": accuracy}])
        lines = Explanation(path=tmp_path, data=data, arrays={}).summary().splitlines()
        return [line for line in lines if "Caution" in line]

    # Three classes: chance 1/3; the bar is a tenth of the way on to 1, 0.4 exactly.
    assert caution(0.35) == ["  Caution: the final model is right on 35% of the analysis set "
                             "(chance: 33%); it has learned little, so there is little for "
                             "this explanation to explain: train longer and explain again (a "
                             "model that does better in your own evaluation may expect other "
                             "inputs: whylook feeds it float pixels in [0, 1], so its "
                             "normalisation must be inside the model)"]
    assert caution(0.399) != []
    assert caution(0.4) == []
    assert caution(0.97) == []
    assert caution(None) == []  # written before the field existed: no claim either way


def test_near_chance_caution_names_inputs_only_for_imported_checkpoints(tmp_path):
    """whylook trained a "train" run on the very pixels it explains it with: the clause on
    normalisation outside the model is for checkpoints from the user's own training."""
    from whylook.explain import Explanation

    def caution(run):
        data = summary_data(checkpoints=[{}, {}, {"analysis_accuracy": 0.35}], **run)
        lines = Explanation(path=tmp_path, data=data, arrays={}).summary().splitlines()
        return [line for line in lines if "Caution" in line]

    short = ("  Caution: the final model is right on 35% of the analysis set (chance: 33%); it "
             "has learned little, so there is little for this explanation to explain: train "
             "longer and explain again")
    clause = (" (a model that does better in your own evaluation may expect other inputs: "
              "whylook feeds it float pixels in [0, 1], so its normalisation must be inside "
              "the model)")
    assert caution({"run": {"source": "train"}}) == [short]
    assert caution({"run": {"source": "import"}}) == [short + clause]
    # Written before the source was recorded: it may be an import, so the clause stays.
    assert caution({"run": {"data": "mnist5k"}}) == [short + clause]
    assert caution({}) == [short + clause]


def test_explanation_records_whether_the_run_was_trained_or_imported(
    tmp_path: Path, tmp_path_factory
) -> None:
    """explanation.json's run.source is run.json's: the same checkpoints, trained by whylook
    or imported, get the normalisation clause only as an import."""
    from _tiny_run import baseline, explain_argv
    from whylook.cli import main
    from whylook.explain import Explanation, load_explanation

    data, reference = baseline(tmp_path_factory)
    imported = tmp_path / "imported"
    files = sorted(str(f) for f in (reference / "checkpoints").glob("ckpt-*.safetensors"))
    assert main(["import", *files, "--data", f"npz:{data}", "--model", "smallcnn",
                 "--device", "cpu", "--out", str(imported)]) == 0
    assert main(explain_argv(imported)) == 0

    def summary_near_chance(exp: Explanation) -> str:
        data = json.loads(json.dumps(exp.data))
        data["checkpoints"][-1]["analysis_accuracy"] = 0.3  # three classes: chance 33%
        return Explanation(path=exp.path, data=data, arrays={}).summary()

    trained, brought = load_explanation(reference), load_explanation(imported)
    assert json.loads((reference / "run.json").read_text())["source"] == "train"
    assert trained.data["run"]["source"] == "train"
    assert brought.data["run"]["source"] == "import"
    assert "Caution: the final model is right on 30%" in summary_near_chance(trained)
    assert "normalisation must be inside the model" not in summary_near_chance(trained)
    assert "normalisation must be inside the model" in summary_near_chance(brought)


def test_summary_counts_class_pairs_not_entries(tmp_path):
    """Two uncertain prototypes on one pair, a third on another: 3 prototypes, 2 pairs."""
    from whylook.explain import Explanation

    def entry(pid, a, b):
        return {"id": pid, "classes": [a, b], "swings": 2, "steps": [1, 2]}

    data = summary_data(uncertain_prototypes=[
        entry("P-0", "a", "b"), entry("P-1", "b", "a"), entry("P-2", "a", "c")])
    text = Explanation(path=tmp_path, data=data, arrays={}).summary()
    assert "Uncertain prototypes: 3 of 4 on 2 class pairs (3 prototype-pair entries)" in text


def test_summary_says_how_much_the_flagged_pairs_were_confused(tmp_path):
    from whylook.explain import Explanation

    def line(check):
        data = summary_data(uncertain_pairs_confusion=check)
        text = Explanation(path=tmp_path, data=data, arrays={}).summary()
        return [x for x in text.splitlines() if "average class pair" in x]

    def check(lift):
        return {"flagged_pairs": 2, "flagged_mean": 3.0, "all_pairs_mean": 3.0 / lift,
                "lift": lift}

    assert line(check(1.66)) == [
        "  the model confused those pairs 1.66x as often as the average class pair (errors "
        "both ways, every checkpoint after the first)"]
    weak = line(check(1.02))
    assert len(weak) == 1
    assert "barely more: over many pairs, many swings come from samples whose" in weak[0]
    assert line(None) == []  # written before the field existed
    assert line({"flagged_pairs": 0, "flagged_mean": None, "all_pairs_mean": 2.0,
                 "lift": None}) == []  # nothing flagged


@pytest.mark.parametrize(("lift", "start", "verdict"), [
    (0.994, "0.99x as often as", "; no more: "),
    (0.995, "as often as", "; no more: "),  # prints as 1.00: rounded half up
    (1.0, "as often as", "; no more: "),
    (1.004, "as often as", "; no more: "),
    (1.006, "1.01x as often as", "; barely more: "),
    (1.2449, "1.24x as often as", "; barely more: "),
    (1.2451, "1.25x as often as", None),  # prints as 1.25, the bar: no caution
])
def test_summary_words_a_lift_as_its_printed_figure(tmp_path, lift, start, verdict):
    """A lift that prints as 1.00 reads "as often as" with "no more", never "1.00x as
    often" or "barely more"; the caution follows the figure shown, not hidden decimals."""
    from whylook.explain import Explanation

    data = summary_data(uncertain_pairs_confusion={
        "flagged_pairs": 2, "flagged_mean": 3.0, "all_pairs_mean": 3.0 / lift, "lift": lift})
    text = Explanation(path=tmp_path, data=data, arrays={}).summary()
    [found] = [x for x in text.splitlines() if "average class pair" in x]
    assert found.startswith(f"  the model confused those pairs {start} the average class pair "
                            "(errors both ways, every checkpoint after the first)")
    assert "1.00x" not in found
    if verdict is None:
        assert "; " not in found
    else:
        assert verdict in found


def test_an_absurd_lift_from_an_edited_file_is_printed_not_raised():
    from whylook._text import pair_confusion_text

    assert pair_confusion_text(1e27).startswith("the model confused those pairs 1000000000000")


def test_summary_says_how_many_it_leaves_out(tmp_path):
    """The summary lists 6 shared prototypes per class and 10 uncertain entries; what it
    leaves out it counts, so a reader never takes a cut list for the whole."""
    from whylook.explain import Explanation

    ids = [f"P-{i}" for i in range(9)]
    uncertain = [{"id": f"P-{i}", "classes": ["a", "b"], "swings": 2, "steps": [1, 2]}
                 for i in range(12)]
    data = summary_data(uncertain_prototypes=uncertain)
    data["classes_explained"][0]["shared"] = ids
    data["classes_explained"][1]["shared"] = ids[:6]
    lines = Explanation(path=tmp_path, data=data, arrays={}).summary().splitlines()
    assert "             a: P-0, P-1, P-2, P-3, P-4, P-5 (+3 more)" in lines
    assert "             b: P-0, P-1, P-2, P-3, P-4, P-5" in lines
    assert sum(line.startswith("  P-") for line in lines) == 10
    assert "  ... 2 more entries in explanation.json and the report" in lines


def test_support_threshold_is_bonferroni_for_the_number_of_fits():
    from whylook.structure import support_threshold

    assert support_threshold(2.0, 1) == 2.0
    for n_fits in (2, 3):
        z = support_threshold(2.0, n_fits)
        assert stats.norm.sf(z) * n_fits == pytest.approx(stats.norm.sf(2.0), rel=1e-9)


def test_best_of_two_fits_against_the_raised_threshold():
    labels, mass, conf, beta, se, groups = _base()
    mass[labels == 0, :3] = 0.5  # P-0, P-1, P-2 active in every sample of a
    global_beta, class_beta = beta.copy(), beta.copy()
    # z of the support = beta / se over T equal-weight steps: beta * sqrt(T) / 0.1.
    global_beta[:, 0, 0] = 2.1 * 0.1 / np.sqrt(T)  # z 2.1: passes alone, not as best of two
    class_beta[:, 1, 0] = 3.0 * 0.1 / np.sqrt(T)  # z 3.0 in the class fit only
    global_beta[:, 2, 0] = 2.5 * 0.1 / np.sqrt(T)  # z 2.5 in the global fit only
    s = assemble(
        classes=["a", "b", "c"], steps=[0, 1, 10, 100, 1000], labels=labels, activity=mass,
        confidence=conf, beta=global_beta, beta_se=se, class_groups=groups,
        settings=StructureSettings(active_threshold=0.1),
        support_fits=[(global_beta, se), (class_beta, se)],
    )
    assert s.support_threshold == pytest.approx(2.278, abs=1e-3)
    assert set(s.classes[0].shared) == {"P-1", "P-2"}
    np.testing.assert_allclose(s.support_z[:3, 0], [2.1, 3.0, 2.5], rtol=1e-5)
    np.testing.assert_allclose(s.support_z_by_fit[:, 1, 0], [0.0, 3.0], atol=1e-6)
    alone = _run(labels, mass, conf, global_beta, se, groups)
    assert set(alone.classes[0].shared) == {"P-0", "P-2"}


def _shared_part_data(seed: int = 0):
    """Classes a, b, c; P-0 is a part of both a and b, P-1 of a only, P-2 of c only.

    While a class is learned, attention to its parts rises and so does its confidence, at
    the expense of the other classes. b's samples look at P-0 three times as hard as a's
    do for the same confidence, so across all samples more attention to P-0 goes with
    *less* confidence in a: the global beta credits P-0 to b alone.
    """
    rng = np.random.default_rng(seed)
    m, k, t, n_per = 3, 3, 4, 200
    labels = np.repeat(np.arange(m), n_per)
    parts = {0: {0: 1.0, 1: 1.0}, 1: {0: 1.0 / 3.0}, 2: {2: 1.0}}  # class -> {part: effect}
    scale = {0: 1.0, 1: 3.0, 2: 1.0}  # how hard each class's samples look at their parts
    dp = rng.normal(0.0, 0.01, size=(t, labels.size, k))
    dy = np.zeros((t, labels.size, m))
    for i, y in enumerate(labels):
        for part, effect in parts[y].items():
            rise = scale[y] * rng.uniform(0.0, 1.0, size=t)
            dp[:, i, part] += rise
            dy[:, i, y] += effect * rise
        dy[:, i, y] += rng.normal(0.0, 0.05, size=t)
        for other in range(m):
            if other != y:
                dy[:, i, other] = -dy[:, i, y] / (m - 1)
    conf = np.concatenate([np.full((1, labels.size, m), 1.0 / m), 1.0 / m + np.cumsum(dy, 0)])
    activity = np.zeros((labels.size, k))
    for i, y in enumerate(labels):
        activity[i, list(parts[y])] = 1.0
    return labels, dp, dy, conf, activity


def test_a_part_of_two_classes_is_shared_by_both_with_the_class_conditional_fit():
    from whylook.mapping import fit_class_mapping, fit_mapping

    labels, dp, dy, conf, activity = _shared_part_data()
    glob = fit_mapping(dp, dy, n_boot=50)
    cls = fit_class_mapping(dp, dy, labels, n_boot=50)
    common = {
        "classes": ["a", "b", "c"], "steps": [0, 1, 10, 100, 1000], "labels": labels,
        "activity": activity, "confidence": conf, "beta": glob.beta, "beta_se": glob.beta_se,
        "class_groups": -np.ones(labels.size, dtype=np.int16),
    }
    alone = assemble(**common)
    both = assemble(**common, support_fits=[(glob.beta, glob.beta_se), (cls.beta, cls.beta_se)])
    # The global beta alone misses a's part that b shares, and says it works against a.
    assert alone.classes[0].shared == ("P-1",)
    assert alone.support_z[0, 0] < 0
    assert "P-0" in alone.classes[1].shared
    # Read from both fits, each class gets its parts and only those.
    assert set(both.classes[0].shared) == {"P-0", "P-1"}
    assert set(both.classes[1].shared) == {"P-0"}
    assert set(both.classes[2].shared) == {"P-2"}


def test_learning_unseen_closed_form():
    """Class a rises 0.2 then 0.6 (weights 1/4, 3/4); its samples' maps are all zero at
    both ends of the second transition for half of them: 3/4 * 1/2 of its learning."""
    labels, mass, conf, beta, se, groups = _base()
    rows = np.flatnonzero(labels == 0)
    conf[:, rows, 0] = np.array([0.2, 0.4, 1.0, 1.0, 1.0])[:, None]
    zero = np.zeros((T + 1, labels.size), dtype=bool)
    zero[1:3, rows[: N_PER // 2]] = True  # both checkpoints of transition 1
    zero[0, rows[N_PER // 2:]] = True  # one end of transition 0 only: its change is seen
    zero[3, labels == 1] = True  # b never rises (uniform weights); 1 of 4 ends each side
    s = _run(labels, mass, conf, beta, se, groups, zero_maps=zero)
    unseen = [c.learning_unseen for c in s.classes]
    assert unseen == pytest.approx([0.75 * 0.5, 0.0, 0.0])
    expected_rate = np.stack([zero[:, labels == c].mean(axis=1) for c in range(M)], axis=1)
    np.testing.assert_allclose(s.zero_saliency_rate, expected_rate)
    assert [c["learning_unseen"] for c in s.to_json()["classes_explained"]] == [
        0.375, 0.0, 0.0]
    # A fall is no learning (weight 0), not learning: rises 0.2, 0.6, 0, 0.4 give the
    # blank transition 1 a weight of 1/2, of which half the samples are unseen.
    fall = conf.copy()
    fall[:, rows, 0] = np.array([0.2, 0.4, 1.0, 0.6, 1.0])[:, None]
    a_fall = _run(labels, mass, fall, beta, se, groups, zero_maps=zero).classes[0]
    assert a_fall.learning_unseen == pytest.approx(0.5 * 0.5)
    # Without maps there is no reading, not a zero.
    plain = _run(labels, mass, conf, beta, se, groups)
    assert plain.zero_saliency_rate is None
    assert plain.to_json()["classes_explained"][0]["learning_unseen"] is None
    with pytest.raises(WhylookError, match=r"zero_maps must be a bool array of shape \(T\+1, 60\)"):
        _run(labels, mass, conf, beta, se, groups, zero_maps=zero[:, :10])
    with pytest.raises(WhylookError, match=r"zero_maps must have one row per checkpoint \(5\)"):
        _run(labels, mass, conf, beta, se, groups, zero_maps=zero[:3])


def test_summary_names_classes_learned_unseen(tmp_path):
    from whylook.explain import Explanation

    data = summary_data(classes_explained=[
        {"class": c, "shared": ["P-0"], "specialized": [], "learning_unseen": u}
        for c, u in zip("abc", [0.78, 0.2, 0.25], strict=True)])
    text = Explanation(path=tmp_path, data=data, arrays={}).summary()
    assert "Learning unseen (Grad-CAM all zero): a (78%), c (25%) of the class's learning" in text
    for entry in data["classes_explained"]:
        entry["learning_unseen"] = 0.1
    assert "Learning unseen" not in Explanation(path=tmp_path, data=data, arrays={}).summary()


def test_summary_names_each_pair_once_when_there_are_few(tmp_path):
    from whylook.explain import Explanation

    order = [{"pair": list(p), "separated_at_step": 5 * i}
             for i, p in enumerate((("a", "b"), ("a", "c"), ("b", "c")))]
    text = Explanation(path=tmp_path, data=summary_data(learning_order=order),
                       arrays={}).summary()
    assert "Learning order: separated a/b, a/c, b/c (first to last)" in text
    many = [{"pair": [f"c{i}", f"c{i + 1}"], "separated_at_step": i} for i in range(11)]
    text = Explanation(path=tmp_path, data=summary_data(learning_order=many),
                       arrays={}).summary()
    assert ("Learning order: first separated c0/c1, c1/c2, c2/c3, c3/c4, c4/c5; last "
            "c6/c7, c7/c8, c8/c9, c9/c10, c10/c11") in text


def _correlated(n_classes: int, separated: int, t1: int = 6):
    """(classes, steps, labels, confidence) in which ``separated`` of the class pairs get
    separated, each at its own checkpoint, and the others never."""
    n_per = 10
    labels = np.repeat(np.arange(n_classes), n_per)
    conf = np.full((t1, labels.size, n_classes), 1.0 / n_classes)
    pairs = [(a, b) for a in range(n_classes) for b in range(a + 1, n_classes)]
    for i, (a, b) in enumerate(pairs[:separated]):
        # Each class of the pair ranks the other lower, and every other class as before
        # (tied): no other pair separates with it.
        conf[i + 1:, labels == a, b] -= 0.01
        conf[i + 1:, labels == b, a] -= 0.01
    return [str(c) for c in range(n_classes)], list(range(t1)), labels, conf


@pytest.mark.parametrize("separated", [0, 1, 2, 3, 4])
def test_learning_order_correlation_needs_three_separated_pairs(separated):
    """With fewer than 3 separated pairs the rank correlation has nothing to rank (one
    pair against the never-separated rest): null, not a coefficient."""
    classes, steps, labels, conf = _correlated(5, separated)
    rng = np.random.default_rng(0)
    s = assemble(classes=classes, steps=steps, labels=labels,
                 activity=rng.dirichlet(np.ones(8), labels.size), confidence=conf,
                 beta=np.zeros((len(steps) - 1, 8, 5)),
                 beta_se=np.ones((len(steps) - 1, 8, 5)),
                 class_groups=-np.ones(labels.size, dtype=np.int16))
    order = s.learning_order
    assert sum(p.separated_at_step is not None for p in order.pairs) == separated
    corr = s.to_json()["learning_order_correlation"]
    assert corr["n_pairs"] == 10
    if separated < 3:
        assert (order.spearman, order.p_value) == (None, None)
        assert corr["spearman"] is None
        assert corr["p_value"] is None
    else:
        when = [p.separated_at_checkpoint if p.separated_at_checkpoint is not None
                else len(steps) for p in order.pairs]
        expected = stats.spearmanr([p.distinctness for p in order.pairs], when)
        assert order.spearman == pytest.approx(expected.statistic)
        assert order.p_value == pytest.approx(expected.pvalue)


def test_summary_prints_no_correlation_of_fewer_than_three_separated_pairs(tmp_path):
    """Also for a file written before structure left such a coefficient out."""
    from whylook.explain import Explanation

    def corr_line(separated, spearman=-1.0, p_value=0.0):
        order = [{"pair": list(p), "separated_at_step": (i + 1) * 10 if i < separated else None}
                 for i, p in enumerate((("a", "b"), ("a", "c"), ("b", "c")))]
        data = summary_data(learning_order=order, learning_order_correlation={
            "spearman": spearman, "p_value": p_value, "n_pairs": 3})
        text = Explanation(path=tmp_path, data=data, arrays={}).summary()
        return [x for x in text.splitlines() if "distinctness" in x]

    assert corr_line(1) == ["  distinctness vs separation: not measurable (1 pair separated; "
                            "at least 3 needed)"]
    assert corr_line(2) == ["  distinctness vs separation: not measurable (2 pairs separated; "
                            "at least 3 needed)"]
    assert corr_line(0, None, None) == ["  distinctness vs separation: not measurable (0 pairs "
                                        "separated; at least 3 needed)"]
    assert corr_line(3) == ["  Spearman(distinctness, separation checkpoint) = -1.000 (p < "
                            "1e-06, 3 pairs; negative = more distinct pairs separated first)"]
    assert corr_line(3, None, None) == ["  distinctness vs separation: not measurable (no "
                                        "variation)"]


def test_summary_counts_pairs_never_separated_apart(tmp_path):
    from whylook.explain import Explanation

    order = [{"pair": ["a", "b"], "separated_at_step": 3},
             {"pair": ["a", "c"], "separated_at_step": 7},
             {"pair": ["b", "c"], "separated_at_step": None}]
    text = Explanation(path=tmp_path, data=summary_data(learning_order=order),
                       arrays={}).summary()
    assert "Learning order: separated a/b, a/c (first to last); 1 pair never separated" in text
