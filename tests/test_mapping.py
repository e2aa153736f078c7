"""Step 5: ridge mapping with CV lambda and jackknife or bootstrap z-scores."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from whylook.errors import WhylookError
from whylook.mapping import DEFAULT_ALPHAS, fit_class_mapping, fit_mapping, ridge_fit


def test_fixed_lambda_is_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    pi = rng.normal(size=(50, 6))
    c = rng.normal(size=(50, 3))
    for lam in (0.0, 0.3, 25.0):
        expected = np.linalg.solve(pi.T @ pi + lam * np.eye(6), pi.T @ c)
        fit = ridge_fit(pi, c, lam=lam, n_boot=0)
        np.testing.assert_allclose(fit.beta, expected, rtol=1e-10, atol=1e-12)
        assert fit.lam == lam
    # More prototypes than samples: the closed form still holds for lambda > 0.
    pi_wide = rng.normal(size=(5, 8))
    expected = np.linalg.solve(pi_wide.T @ pi_wide + 0.7 * np.eye(8), pi_wide.T @ c[:5])
    np.testing.assert_allclose(ridge_fit(pi_wide, c[:5], lam=0.7, n_boot=0).beta, expected)


def test_cv_prefers_more_shrinkage_for_noise() -> None:
    rng = np.random.default_rng(1)
    pi = rng.normal(size=(300, 8))
    clean = pi @ rng.normal(size=(8, 4)) + rng.normal(0, 0.05, (300, 4))
    noise = rng.normal(size=(300, 4))
    fit_clean = ridge_fit(pi, clean, n_boot=0)
    fit_noise = ridge_fit(pi, noise, n_boot=0)
    assert fit_noise.lam > 100 * fit_clean.lam
    assert fit_clean.cv_r2 > 0.95
    assert fit_noise.cv_r2 < 0.05


def test_cv_agrees_with_sklearn_ridgecv() -> None:
    rng = np.random.default_rng(2)
    pi = rng.normal(size=(120, 5))
    c = pi @ rng.normal(0, 0.3, size=(5, 3)) + rng.normal(size=(120, 3))
    fit = ridge_fit(pi, c, n_boot=0)
    grid = np.asarray(DEFAULT_ALPHAS) * (pi**2).sum() / 5
    ref = RidgeCV(alphas=grid, fit_intercept=False).fit(pi, c)
    assert fit.lam == pytest.approx(ref.alpha_, rel=1e-9)
    np.testing.assert_allclose(fit.beta, ref.coef_.T, rtol=1e-8, atol=1e-10)


def _planted(seed: int = 3, n: int = 400, k: int = 6, m: int = 3) -> tuple[np.ndarray, ...]:
    """One planted effect (prototype 2 -> class 1) in noise whose size varies by sample."""
    rng = np.random.default_rng(seed)
    pi = rng.normal(size=(n, k))
    true = np.zeros((k, m))
    true[2, 1] = 0.5
    noise = rng.normal(0, 1.0, (n, m)) * (0.5 + np.abs(pi[:, :1]))  # heteroskedastic
    return pi, pi @ true + noise


@pytest.mark.parametrize("method", ["jackknife", "bootstrap"])
def test_standard_errors_separate_signal_from_noise(method: str) -> None:
    pi, c = _planted()
    m = c.shape[1]
    fit = ridge_fit(pi, c, standard_errors=method, n_boot=200, seed=0)  # type: ignore[arg-type]
    assert fit.z[2, 1] > 6
    null = np.delete(fit.z.ravel(), 2 * m + 1)
    assert np.abs(null).max() < 3.5
    np.testing.assert_allclose(fit.z, fit.beta / fit.beta_se)
    again = ridge_fit(pi, c, standard_errors=method, n_boot=200, seed=0)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.beta_se, fit.beta_se)
    other = ridge_fit(pi, c, standard_errors=method, n_boot=200, seed=1)  # type: ignore[arg-type]
    # The bootstrap depends on its seed; the jackknife has none.
    assert np.array_equal(other.beta_se, fit.beta_se) == (method == "jackknife")


@pytest.mark.parametrize("lam", [0.0, 3.0, "cv"])
def test_jackknife_is_the_delete_one_refits(lam: float | str) -> None:
    """The closed form equals n explicit refits without one sample each, at the fit's lambda."""
    pi, c = _planted(seed=7, n=60, k=5, m=2)
    fit = ridge_fit(pi, c, lam=lam)  # type: ignore[arg-type]
    n, k = pi.shape
    refits = np.stack([
        np.linalg.solve(np.delete(pi, i, 0).T @ np.delete(pi, i, 0) + fit.lam * np.eye(k),
                        np.delete(pi, i, 0).T @ np.delete(c, i, 0))
        for i in range(n)
    ])
    expected = np.sqrt((n - 1) / n * ((refits - refits.mean(axis=0)) ** 2).sum(axis=0))
    np.testing.assert_allclose(fit.beta_se, expected, rtol=1e-9)


def test_jackknife_agrees_with_a_long_bootstrap() -> None:
    """Both estimate the same sampling noise: with 4000 resamples the bootstrap's own noise
    is ~1%, and the jackknife's leverage correction adds ~k/n on top."""
    pi, c = _planted()
    jack = ridge_fit(pi, c).beta_se
    boot = ridge_fit(pi, c, standard_errors="bootstrap", n_boot=4000, seed=0).beta_se
    ratio = jack / boot
    assert ratio.min() > 0.95, ratio
    assert ratio.max() < 1.1, ratio


def test_a_coefficient_one_sample_carries_is_not_significant() -> None:
    """Leaving that sample out removes the coefficient, so the jackknife puts its z near 1
    whatever its size; a bootstrap resample holds the sample or not, z ~ 2.07."""
    rng = np.random.default_rng(9)
    n = 300
    pi = rng.normal(size=(n, 3))
    pi[:, 2] = 0.0
    pi[0, 2] = 5.0  # only sample 0 ever changed its attention to prototype 2
    c = pi[:, :1] * 0.3 + rng.normal(0, 0.1, (n, 1))
    c[0] += 4.0
    jack = ridge_fit(pi, c, lam=0.01)
    boot = ridge_fit(pi, c, lam=0.01, standard_errors="bootstrap", n_boot=400, seed=0)
    assert jack.beta[2, 0] > 0.5
    assert 0.9 < jack.z[2, 0] < 1.1
    assert 1.8 < boot.z[2, 0] < 2.4
    assert jack.z[0, 0] > 10  # the real effect stays clear
    # Without shrinkage that sample alone fixes the coefficient, and the fit without it
    # is not unique (the update formula would divide by zero): it is refitted, and the
    # minimum-norm solution, which puts 0 there, gives the same reading.
    free = ridge_fit(pi, c, lam=0.0)
    assert free.beta[2, 0] > 0.5
    assert 0.9 < free.z[2, 0] < 1.1
    assert np.isfinite(free.beta_se).all()
    assert free.z[0, 0] > 10


def test_constant_prototype_gets_zero_z() -> None:
    rng = np.random.default_rng(4)
    pi = rng.normal(size=(80, 3))
    pi[:, 1] = 0.0  # a prototype whose intensity never changes
    fit = ridge_fit(pi, rng.normal(size=(80, 2)), n_boot=50)
    np.testing.assert_array_equal(fit.z[1], 0.0)
    assert np.isfinite(fit.z).all()


def test_fit_mapping_groups_and_skips() -> None:
    rng = np.random.default_rng(5)
    t_count, n, k, m = 2, 200, 4, 3
    dp = rng.normal(size=(t_count, n, k))
    groups = np.zeros((t_count, n), np.int16)
    groups[:, 100:] = 1
    groups[:, 195:] = 2  # 5 samples: below min_group_size, skipped
    groups[:, :3] = -1  # noise is never fitted
    b0, b1 = rng.normal(size=(k, m)), rng.normal(size=(k, m))
    dy = np.where((groups == 1)[..., None], dp @ b1, dp @ b0) + rng.normal(0, 0.01, (t_count, n, m))
    mp = fit_mapping(dp, dy, groups=groups, n_boot=30, seed=0)
    assert mp.beta.shape == mp.z.shape == mp.beta_se.shape == (t_count, k, m)
    assert mp.beta.dtype == np.float32
    assert mp.lambdas.shape == (t_count,)
    assert mp.lambda_mode == "cv"
    assert sorted(mp.group_betas) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert mp.skipped_groups == ((0, 2, 5), (1, 2, 5))
    np.testing.assert_allclose(mp.group_betas[(1, 0)], b0, atol=0.01)
    np.testing.assert_allclose(mp.group_betas[(1, 1)], b1, atol=0.01)
    assert mp.group_fit(0, 1).n == 95
    with pytest.raises(WhylookError, match="skipped or absent"):
        mp.group_fit(0, 2)
    # Transition t alone gives the same fit as inside fit_mapping (seeded per transition:
    # the bootstrap, since the jackknife draws nothing and would match under any seed).
    boot = fit_mapping(dp, dy, standard_errors="bootstrap", n_boot=30, seed=0)
    for t in range(t_count):
        alone = ridge_fit(dp[t], dy[t], standard_errors="bootstrap", n_boot=30, seed=[0, t, 0])
        np.testing.assert_allclose(boot.beta_se[t], alone.beta_se, rtol=1e-6)
    assert not np.allclose(boot.beta_se[0], boot.beta_se[1])
    fixed = fit_mapping(dp, dy, lam=2.0, standard_errors="none")
    assert fixed.lambda_mode == "fixed"
    np.testing.assert_array_equal(fixed.lambdas, [2.0, 2.0])
    assert np.isnan(fixed.z).all()


def test_threads_do_not_change_the_fits() -> None:
    """Fits run on threads are the serial fits, bit for bit (seeds are per fit: read
    through the bootstrap, the only standard errors that draw anything)."""
    rng = np.random.default_rng(8)
    t_count, n, k, m = 3, 150, 4, 3
    dp = rng.normal(size=(t_count, n, k))
    dy = dp @ rng.normal(size=(k, m)) + rng.normal(0, 0.5, (t_count, n, m))
    groups = rng.integers(-1, 3, size=(t_count, n))
    labels = rng.integers(0, m, n)
    for method in ("jackknife", "bootstrap"):
        one = fit_mapping(dp, dy, groups=groups, standard_errors=method, n_boot=20, seed=3)
        two = fit_mapping(dp, dy, groups=groups, standard_errors=method, n_boot=20, seed=3,
                          n_jobs=2)
        for name in ("beta", "beta_se", "z", "lambdas", "cv_r2"):
            np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
        assert [(g.t, g.group) for g in one.group_fits] == [
            (g.t, g.group) for g in two.group_fits]
        for a, b in zip(one.group_fits, two.group_fits, strict=True):
            np.testing.assert_array_equal(a.fit.beta_se, b.fit.beta_se)
    c_one = fit_class_mapping(dp, dy, labels, standard_errors="bootstrap", n_boot=20, seed=3)
    c_two = fit_class_mapping(dp, dy, labels, standard_errors="bootstrap", n_boot=20, seed=3,
                              n_jobs=-1)
    np.testing.assert_array_equal(c_one.z, c_two.z)
    np.testing.assert_array_equal(c_one.lambdas, c_two.lambdas)
    # Each class's fit is the ridge of its own samples on its own confidence.
    rows = np.flatnonzero(labels == 1)
    alone = ridge_fit(dp[2, rows], dy[2, rows, 1:2], standard_errors="bootstrap", n_boot=20,
                      seed=[3, 2, 1001])
    np.testing.assert_allclose(c_one.beta_se[2, :, 1], alone.beta_se[:, 0], rtol=1e-6)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(WhylookError, match="n_jobs must be"):
            fit_mapping(dp, dy, n_jobs=bad)  # type: ignore[arg-type]
        with pytest.raises(WhylookError, match="n_jobs must be"):
            fit_class_mapping(dp, dy, labels, n_jobs=bad)  # type: ignore[arg-type]


def test_fast_at_paper_scale() -> None:
    rng = np.random.default_rng(6)
    t_count, n, k, m = 12, 2000, 32, 10
    dp = rng.normal(size=(t_count, n, k))
    dy = rng.normal(size=(t_count, n, m))
    groups = rng.integers(-1, 5, size=(t_count, n))
    start = time.perf_counter()
    mp = fit_mapping(dp, dy, groups=groups, n_boot=100)
    elapsed = time.perf_counter() - start
    assert len(mp.group_fits) == 5 * t_count
    assert elapsed < 20, f"fit_mapping took {elapsed:.1f} s"


def test_bad_input() -> None:
    dp = np.zeros((2, 10, 3))
    with pytest.raises(WhylookError, match="same T and n"):
        fit_mapping(dp, np.zeros((2, 9, 4)))
    with pytest.raises(WhylookError, match="lam must"):
        ridge_fit(dp[0], np.zeros((10, 2)), lam=-1.0)
    with pytest.raises(WhylookError, match="n_boot"):
        ridge_fit(dp[0], np.zeros((10, 2)), n_boot=1)
    for call in (lambda: ridge_fit(dp[0], np.zeros((10, 2)), standard_errors="exact"),
                 lambda: fit_mapping(dp, np.zeros((2, 10, 4)), standard_errors="hc3"),
                 lambda: fit_class_mapping(dp, np.zeros((2, 10, 4)), np.zeros(10, int),
                                           standard_errors=None)):
        with pytest.raises(WhylookError, match="standard_errors must be one of"):
            call()  # type: ignore[arg-type]
    with pytest.raises(WhylookError, match="groups"):
        fit_mapping(dp, np.zeros((2, 10, 4)), groups=np.zeros((2, 9), int))
    bad = dp.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(WhylookError, match="NaN or infinite"):
        fit_mapping(bad, np.zeros((2, 10, 4)))


def test_explain_stores_every_group_fit(tmp_path_factory) -> None:
    """METHOD fits β per HDBSCAN group too; explain keeps those fits in arrays.npz, each
    the fit of exactly its group's rows (refitted here from the stored arrays)."""
    from _tiny_run import baseline, load_arrays
    from whylook.explain import load_explanation
    from whylook.intensity import delta

    _, run = baseline(tmp_path_factory)
    a = load_arrays(run)
    settings = load_explanation(run).data["settings"]
    t_count, k, m = a["beta"].shape
    key = a["beta_group_key"]
    expected = [
        (t, g, int((a["groups"][t] == g).sum()))
        for t in range(t_count)
        for g in np.unique(a["groups"][t])
        if g >= 0 and (a["groups"][t] == g).sum() >= 10
    ]
    assert key.tolist() == [list(e) for e in expected]
    assert len(expected) > 0, "the tiny run must have at least one group to check"
    g_count = len(expected)
    for name in ("beta_group", "beta_group_se", "beta_group_z"):
        assert a[name].shape == (g_count, k, m), name
        assert a[name].dtype == np.float32, name
    assert load_explanation(run).data["mapping"]["group_fits"] == g_count
    refit = fit_mapping(delta(a["intensity"]), delta(a["confidence"]), groups=a["groups"],
                        lam=settings["ridge_lambda"],
                        standard_errors=settings["standard_errors"],
                        n_boot=settings["bootstrap"], seed=settings["seed"])
    for name, values in refit.group_arrays().items():
        np.testing.assert_array_equal(a[name], values, err_msg=name)
    t, g, _ = expected[-1]
    rows = a["groups"][t] == g
    alone = ridge_fit(delta(a["intensity"])[t][rows], delta(a["confidence"])[t][rows],
                      n_boot=settings["bootstrap"], seed=[settings["seed"], t, g + 1])
    np.testing.assert_allclose(a["beta_group"][-1], alone.beta, rtol=1e-5, atol=1e-6)


def test_explanation_describes_every_learning_pattern(tmp_path_factory) -> None:
    """explanation.json lists every HDBSCAN group (fitted or too small to fit) with what
    its confidences did, recomputed here from the stored arrays, and the prototypes its
    own fit credits with the gain, checked against the stored group fits."""
    from _tiny_run import baseline, load_arrays
    from whylook.explain import load_explanation

    _, run = baseline(tmp_path_factory)
    a = load_arrays(run)
    d = load_explanation(run).data
    groups, conf = a["groups"], a["confidence"].astype(np.float64)
    every = [(t, int(g), int((groups[t] == g).sum()))
             for t in range(groups.shape[0]) for g in np.unique(groups[t]) if g >= 0]
    entries = d["learning_patterns"]
    assert [(e["transition"], e["group"], e["size"]) for e in entries] == every
    assert any(e["prototypes"] for e in entries), "the tiny run must credit some prototype"
    fitted = {(int(t), int(g)): i for i, (t, g, _) in enumerate(a["beta_group_key"])}
    threshold = d["structure_settings"]["z_threshold"]
    for e in entries:
        t, g = e["transition"], e["group"]
        rows = groups[t] == g
        mean = (conf[t + 1] - conf[t])[rows].mean(axis=0)
        assert e["gained_most"]["class"] == d["classes"][int(np.argmax(mean))]
        counts = np.bincount(a["labels"][rows], minlength=len(d["classes"]))
        assert e["made_of"][0] == {"class": d["classes"][int(np.argmax(counts))],
                                   "share": pytest.approx(counts.max() / rows.sum(), abs=1e-6)}
        shares = [c["share"] for c in e["made_of"]]
        assert shares == sorted(shares, reverse=True)
        assert e["gained_most"]["change"] == pytest.approx(mean.max(), abs=1e-6)
        assert e["steady"] == bool(np.abs(mean).max() < 0.01)
        assert e["steps"] == [d["checkpoints"][t]["step"], d["checkpoints"][t + 1]["step"]]
        if (t, g) not in fitted:
            assert e["prototypes"] is None
            continue
        if e["steady"]:
            assert e["prototypes"] == []
            continue
        c = int(np.argmax(mean))
        z, beta = a["beta_group_z"][fitted[(t, g)]], a["beta_group"][fitted[(t, g)]]
        changed = (np.diff(a["intensity"], axis=0)[t][rows] != 0).sum(axis=0)
        for p in e["prototypes"]:
            k = int(p["id"][2:])
            assert changed[k] >= max(5, 0.1 * rows.sum())
            assert z[k, c] >= threshold - 1e-3
            assert beta[k, c] > 0
            assert p["z"] == pytest.approx(z[k, c], abs=1e-3)


def test_upper_products_match_the_gathered_columns_bit_for_bit() -> None:
    # Both paths (few rows: gather; many: one slice per column) in triu_indices order.
    from whylook.mapping import _upper_products

    rng = np.random.default_rng(3)
    iu, ju = np.triu_indices(7)
    for rows in (3, 600):
        p = rng.normal(size=(rows, 7))
        got = _upper_products(p)
        assert got.shape == (rows, 28)
        assert np.array_equal(got, p[:, iu] * p[:, ju])


def test_explain_records_and_honours_its_standard_errors(tmp_path_factory) -> None:
    """The CLI's --standard-errors reaches Step 5 and the files say which was used: the
    same β either way, different standard errors, and z = β / se in both."""
    from _tiny_run import baseline, copy_run, explain_argv, load_arrays
    from whylook.cli import main
    from whylook.explain import load_explanation

    _, run = baseline(tmp_path_factory)
    jack = load_arrays(run)
    data = load_explanation(run).data
    assert data["settings"]["standard_errors"] == "jackknife"
    assert data["mapping"]["standard_errors"] == "jackknife"
    assert data["mapping"]["bootstrap"] == 0  # no resamples were drawn

    other = copy_run(run, tmp_path_factory.mktemp("bootstrap") / "run")
    assert main(explain_argv(other, "--standard-errors", "bootstrap")) == 0
    boot = load_arrays(other)
    data = load_explanation(other).data
    assert data["settings"]["standard_errors"] == "bootstrap"
    assert data["mapping"] == {**data["mapping"], "standard_errors": "bootstrap",
                               "bootstrap": 100}
    np.testing.assert_array_equal(boot["beta"], jack["beta"])
    assert not np.allclose(boot["beta_se"], jack["beta_se"])
    for a in (jack, boot):
        expected = np.divide(a["beta"], a["beta_se"], out=np.zeros_like(a["beta"]),
                             where=a["beta_se"] > 0)
        np.testing.assert_allclose(a["beta_z"], expected, rtol=1e-4, atol=1e-5)


def test_explain_counts_what_the_uncertain_rule_flags_by_chance(tmp_path_factory) -> None:
    """--uncertain-null N refits Step 5 N times with the confidence changes sign-flipped
    and N times with the intensity changes shuffled across samples, and records what the
    uncertain rule flags each time; off by default."""
    from _tiny_run import baseline, copy_run, explain_argv
    from whylook.cli import main
    from whylook.explain import load_explanation
    from whylook.mapping import fit_mapping
    from whylook.structure import StructureSettings, uncertain_rule

    _, run = baseline(tmp_path_factory)
    data = load_explanation(run).data
    assert data["settings"]["uncertain_null"] == 0
    assert data["uncertain_by_chance"] is None
    other = copy_run(run, tmp_path_factory.mktemp("null") / "run")
    assert main(explain_argv(other, "--uncertain-null", "3")) == 0
    exp = load_explanation(other)
    null = exp.data["uncertain_by_chance"]
    assert exp.data["settings"]["uncertain_null"] == 3
    assert null["draws"] == 3
    assert len(null["sign_flipped"]) == len(null["shuffled"]) == 3
    assert null["sign_flipped_mean"] == pytest.approx(np.mean(null["sign_flipped"]))
    assert null["shuffled_mean"] == pytest.approx(np.mean(null["shuffled"]))
    # The real fit is untouched, and each count is the rule on one refit.
    np.testing.assert_array_equal(exp.arrays["beta"], load_explanation(run).arrays["beta"])
    a = exp.arrays
    dp = np.diff(a["intensity"].astype(np.float64), axis=0)
    dy = np.diff(a["confidence"].astype(np.float64), axis=0)
    rng = np.random.default_rng([exp.data["settings"]["seed"], 6])
    classes = exp.data["classes"]
    rate = np.stack([a["active"][a["labels"] == c].mean(axis=0)
                     for c in range(len(classes))], axis=1)
    steps = [c["step"] for c in exp.data["checkpoints"]]
    structure = StructureSettings(**exp.data["structure_settings"])
    real = {(u["id"], *u["classes"]) for u in exp.data["uncertain_prototypes"]}
    seen: dict[tuple[str, ...], int] = {}

    def rule(x: np.ndarray, y: np.ndarray) -> list[tuple[str, ...]]:
        refit = fit_mapping(x, y)
        return [(u.id, *u.classes) for u in uncertain_rule(
            refit.beta, refit.beta_se, rate, classes, steps, structure, refit.lead_se)]

    for flipped, shuffled in zip(null["sign_flipped"], null["shuffled"], strict=True):
        signs = rng.choice(np.array([-1.0, 1.0]), size=dp.shape[1])
        assert len(rule(dp, dy * signs[None, :, None])) == flipped
        found = rule(dp[:, rng.permutation(dp.shape[1])], dy)
        assert len(found) == shuffled
        for key in real.intersection(found):
            seen[key] = seen.get(key, 0) + 1
    assert {(e["id"], *e["classes"]): e["shuffles"] for e in null["entries_in_shuffles"]} == seen
    assert "by chance (confidence changes sign-flipped, 3 refits)" in exp.summary()


def _refit_lead(dp: np.ndarray, dy: np.ndarray, lambdas: np.ndarray,
                rows: np.ndarray) -> np.ndarray:
    """``(T, K, M, M)`` accumulated leads of ridge fits of ``rows`` at the given lambdas."""
    betas = np.stack([
        np.linalg.solve(dp[t, rows].T @ dp[t, rows] + lambdas[t] * np.eye(dp.shape[2]),
                        dp[t, rows].T @ dy[t, rows])
        for t in range(dp.shape[0])
    ])
    return np.cumsum(betas[:, :, :, None] - betas[:, :, None, :], axis=0)


@pytest.mark.parametrize("lam", [0.5, "cv"])
def test_lead_se_is_the_jackknife_of_the_accumulated_lead(lam: float | str) -> None:
    """Leaving a sample out of every transition at once: the standard error of the lead
    of class a over b, accumulated over transitions, from n explicit refits."""
    rng = np.random.default_rng(11)
    t_count, n, k, m = 3, 40, 3, 3
    dp = rng.normal(size=(t_count, n, k))
    # Softmax-like targets: what one class gains the others lose, so errors correlate.
    raw = dp @ rng.normal(size=(k, m)) + rng.normal(0, 1.0, (t_count, n, m))
    dy = raw - raw.mean(axis=2, keepdims=True)
    mp = fit_mapping(dp, dy, lam=lam)  # type: ignore[arg-type]
    leads = np.stack([_refit_lead(dp, dy, mp.lambdas, np.delete(np.arange(n), i))
                      for i in range(n)])
    expected = np.sqrt((n - 1) / n * ((leads - leads.mean(axis=0)) ** 2).sum(axis=0))
    assert mp.lead_se is not None
    assert mp.lead_se.shape == (t_count, k, m, m)
    np.testing.assert_allclose(mp.lead_se, expected, rtol=1e-4, atol=1e-7)
    # At the first transition it is the jackknife of beta_a - beta_b, which the two
    # coefficients' own standard errors in quadrature get wrong (their errors correlate).
    quadrature = np.sqrt(mp.beta_se[0, :, :, None] ** 2 + mp.beta_se[0, :, None, :] ** 2)
    off = ~np.eye(m, dtype=bool)
    ratio = mp.lead_se[0][:, off] / quadrature[:, off]
    assert ratio.max() > 1.2, ratio


def test_lead_se_of_a_two_class_softmax_is_twice_a_coefficients() -> None:
    """With two classes a sample's confidence change in b is minus that in a: the errors
    of beta_a and beta_b are perfectly anti-correlated, the lead's error is twice each."""
    rng = np.random.default_rng(12)
    dp = rng.normal(size=(2, 200, 4))
    gain = dp @ rng.normal(size=(4, 1)) + rng.normal(0, 1.0, (2, 200, 1))
    for method in ("jackknife", "bootstrap"):
        mp = fit_mapping(dp, np.concatenate([gain, -gain], axis=2),
                         standard_errors=method, n_boot=300)  # type: ignore[arg-type]
        assert mp.lead_se is not None
        np.testing.assert_allclose(mp.lead_se[0, :, 0, 1], 2 * mp.beta_se[0, :, 0], rtol=1e-5)
        np.testing.assert_allclose(mp.lead_se[:, :, 0, 0], 0.0, atol=1e-6)
        np.testing.assert_allclose(mp.lead_se, mp.lead_se.transpose(0, 1, 3, 2))
        if method == "bootstrap":  # resamples differ between transitions: variances add
            np.testing.assert_allclose(mp.lead_se[1, :, 0, 1] ** 2,
                                       4 * (mp.beta_se[0, :, 0] ** 2 + mp.beta_se[1, :, 0] ** 2),
                                       rtol=1e-4)
    assert fit_mapping(dp, np.concatenate([gain, -gain], axis=2),
                       standard_errors="none").lead_se is None


@pytest.mark.parametrize(
    ("n", "k", "m"), [(300, 6, 40), (40, 8, 25), (12, 20, 30), (200, 5, 6), (100, 10, 3)]
)
def test_leave_one_out_error_two_ways_and_against_refits(n: int, k: int, m: int) -> None:
    """The leave-one-out error that picks lambda: from the residuals (M up to the rank)
    and from the Gram matrix (more outputs than the rank, as with many classes) agree,
    and both are the error of n explicit refits without one sample each."""
    from whylook.mapping import _loo_sse, _loo_sse_gram, _loo_sse_residuals

    rng = np.random.default_rng(n + k + m)
    pi = rng.normal(size=(n, k)) * rng.uniform(0.1, 3.0, k)
    c = pi @ (rng.normal(size=(k, m)) * (rng.random((k, m)) < 0.3)) + rng.normal(0, 0.3, (n, m))
    u, s, _ = np.linalg.svd(pi, full_matrices=False)
    lams = np.array([1e-3, 0.1, 1.0, 10.0, 300.0])
    f = s**2 / (s**2 + lams[:, None])
    loo = 1.0 - f @ (u**2).T
    utc = u.T @ c
    gram = _loo_sse_gram(u, c, f, loo, utc)
    resid = _loo_sse_residuals(u, c, f, loo, utc)
    np.testing.assert_allclose(gram, resid, rtol=1e-11)
    refits = np.zeros(lams.size)
    for j, lam in enumerate(lams):
        for i in range(n):
            rest = np.arange(n) != i
            b = np.linalg.solve(pi[rest].T @ pi[rest] + lam * np.eye(k), pi[rest].T @ c[rest])
            refits[j] += ((c[i] - pi[i] @ b) ** 2).sum()
    np.testing.assert_allclose(_loo_sse(u, s, c, lams), refits, rtol=1e-9)
    # The dispatch: the Gram form exactly when there are more outputs than the rank.
    chosen = _loo_sse(u, s, c, lams)
    np.testing.assert_array_equal(chosen, gram if m > u.shape[1] else resid)


def test_class_fits_give_z_0_to_a_prototype_that_never_changes_in_the_class():
    """beta and se of such a prototype are both rounding errors; their ratio (up to 3.6 in
    200 random draws before) must not read as support."""
    from whylook.mapping import fit_class_mapping

    worst = 0.0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        y = np.repeat([0, 1], 15)
        dp = (rng.normal(size=(1, 30, 8)) * rng.uniform(0.01, 100)).astype(np.float32)
        dy = (rng.normal(size=(1, 30, 2)) * 0.1).astype(np.float32)
        dp[0, y == 0, 3] = 0.0
        fit = fit_class_mapping(dp, dy, y)
        worst = max(worst, float(np.abs(fit.z[0, 3, 0]).max()))
        assert np.abs(fit.z[0, :3, 0]).max() > 0  # the others keep their z
    assert worst == 0.0
