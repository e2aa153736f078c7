"""Run comparison: matching, the measures on hand-made arrays, and two small real runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from whylook.compare import (
    compare,
    confusion_difference,
    mask_iou,
    match_prototypes,
    shared_jaccard,
    strategy_difference,
)
from whylook.errors import WhylookError
from whylook.structure import order_correlation_of


def test_iou_matching_recovers_a_relabelling():
    rng = np.random.default_rng(0)
    k = 6
    a = rng.integers(0, k, size=(30, 5, 5))
    perm = rng.permutation(k)
    b = perm[a]  # the same masks under other ids
    iou = mask_iou(a, b, k, k)
    assert iou.shape == (k, k)
    matches = match_prototypes(iou)
    assert [(p, q) for p, q, _ in matches] == [(p, int(perm[p])) for p in range(k)]
    assert all(v == pytest.approx(1.0) for *_, v in matches)


def test_iou_by_hand_and_unequal_k():
    a = np.array([[[0, 0], [1, 1]]])
    b = np.array([[[2, 2], [2, 0]]])
    iou = mask_iou(a, b, 2, 3)
    # P-0 of A = {00, 01}; P-2 of B = {00, 01, 10}: 2 / 3. P-1 of A = {10, 11}; P-0 of B = {11}.
    assert iou[0, 2] == pytest.approx(2 / 3)
    assert iou[1, 0] == pytest.approx(1 / 2)
    assert iou[:, 1].tolist() == [0.0, 0.0]  # B's P-1 is never assigned
    assert len(match_prototypes(iou)) == 2
    with pytest.raises(WhylookError, match="differ in shape"):
        mask_iou(a, b[:, :1], 2, 3)


def test_strategy_difference_is_zero_for_the_same_strategy_and_large_for_unrelated():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(20, 4))
    perm = rng.permutation(20)
    s_b = np.empty_like(s)
    s_b[perm] = s  # B's prototype perm[p] is A's p
    same, per_class = strategy_difference(s, s_b, [(p, int(perm[p])) for p in range(20)])
    assert same == pytest.approx(0.0)
    assert set(per_class) == {0, 1, 2, 3}
    other, _ = strategy_difference(s, rng.normal(size=(20, 4)), [(p, p) for p in range(20)])
    assert 0.5 < other < 1.5
    # A class whose support is constant has no correlation: it is left out, not a NaN.
    s_c = s.copy()
    s_c[:, 0] = 1.0
    _, pc = strategy_difference(s_c, s_c, [(p, p) for p in range(20)])
    assert 0 not in pc


def test_shared_jaccard_maps_ids_and_counts_unmatched_as_different():
    jac = shared_jaccard(
        {"2": ["P-1", "P-2"], "7": ["P-3"], "9": []},
        {"2": ["P-10", "P-20"], "7": ["P-30"], "9": []},
        {"P-1": "P-10", "P-2": "P-20"},  # P-3 has no match
    )
    assert jac == {"2": 1.0, "7": 0.0, "9": None}


def test_confusion_difference_by_hand():
    a = np.array([[8, 2, 0], [0, 10, 0], [1, 0, 9]])
    b = np.array([[10, 0, 0], [0, 9, 1], [1, 0, 9]])
    d = confusion_difference(a, b)
    # off-diagonal |a-b|: 2 (0->1) + 1 (1->2) = 3; errors 3 + 2 = 5
    assert d["l1"] == pytest.approx(3 / 5)
    assert (d["errors_a"], d["errors_b"]) == (3, 2)
    assert confusion_difference(a, a)["l1"] == 0.0


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two small smallcnn runs on mnist5k that differ only in the data-order seed."""
    from _tiny_run import small_mnist_run

    root = tmp_path_factory.mktemp("compare")
    runs = []
    for data_seed in (0, 1):
        small_mnist_run(root / f"seed{data_seed}", data_seed=data_seed)
        runs.append(root / f"seed{data_seed}")
    return runs


@pytest.mark.slow
def test_a_run_compared_with_itself_is_identical(two_runs, tmp_path):
    a, _ = two_runs
    res = compare(a, a, out=tmp_path / "self.json", device="cpu")
    d = res.data
    assert d["matching"]["rows"] == "analysis rows shared by both explanations"
    assert all(p["a"] == p["b"] and p["iou"] == pytest.approx(1.0) for p in d["matching"]["pairs"])
    assert res.strategy_difference == pytest.approx(0.0, abs=1e-9)
    assert d["confusion"]["l1"] == 0.0
    assert d["shared_prototypes"]["mean_jaccard"] in (None, 1.0)
    assert json.loads((tmp_path / "self.json").read_text())["schema"] == "whylook.compare/1"


@pytest.mark.slow
def test_two_seeds_are_compared_and_written_into_run_a(two_runs):
    a, b = two_runs
    res = compare(a, b, device="cpu")
    assert res.path == a / "compare" / f"{b.name}.json"
    d = res.data
    on_disk = json.loads(res.path.read_text())  # written there, not only named
    assert on_disk["schema"] == "whylook.compare/1"
    assert on_disk["run_b"]["path"] == str(b)
    assert any(s.startswith("data_seed") for s in d["config_differences"])
    assert d["matching"]["n_matched"] >= 1
    assert 0.0 <= d["confusion"]["l1"] <= 1.0
    assert d["strategy_difference"]["value"] is not None
    assert d["strategy_difference"]["random_matching"] is not None
    text = res.summary()
    assert "strategy difference" in text
    assert "\n" in text
    # The same agreement per typical attention change, recomputed here from the two runs'
    # arrays: β[t, k, :] times the s.d. over samples of k's intensity change at t.
    from whylook.explain import load_explanation

    ea, eb = load_explanation(a), load_explanation(b)

    def per_sd(e):  # type: ignore[no-untyped-def]
        dp = np.diff(e.arrays["intensity"].astype(np.float64), axis=0)
        return e.arrays["beta"].astype(np.float64) * dp.std(axis=1)[:, :, None]

    sa, sb = per_sd(ea), per_sd(eb)
    pairs = [(int(p["a"][2:]), int(p["b"][2:])) for p in d["matching"]["pairs"]
             if p["iou"] >= d["matching"]["min_iou"]]
    corrs = [np.corrcoef(sa[:, p].ravel(), sb[:, q].ravel())[0, 1] for p, q in pairs]
    assert d["beta_per_sd"]["mean"] == pytest.approx(np.mean(corrs), abs=1e-6)
    support_a, support_b = sa.sum(0), sb.sum(0)
    per_class = [np.corrcoef(support_a[[p for p, _ in pairs], c],
                             support_b[[q for _, q in pairs], c])[0, 1] for c in range(10)]
    assert d["strategy_difference_per_sd"]["value"] == pytest.approx(
        1 - np.nanmean(per_class), abs=1e-6)
    assert "per typical attention change" in text


@pytest.mark.slow
def test_reassigns_b_on_a_rows_when_the_analysis_sets_differ(two_runs, tmp_path):
    from whylook.explain import explain

    a, b = two_runs
    other = tmp_path / "b-other-rows"
    shutil.copytree(b, other)
    explain(other, analysis_size=300, seed=5, device="cpu", progress=False)
    res = compare(a, other, out=tmp_path, device="cpu")
    assert res.data["matching"]["rows"] == "A's analysis rows, B's prototypes reassigned"
    assert res.path == tmp_path / "compare.json"


@pytest.mark.slow
def test_refuses_runs_without_explanation_or_of_other_data(two_runs, tmp_path):
    from whylook.synthetic import planted_dataset
    from whylook.train import train

    a, _ = two_runs
    npz = planted_dataset(n_train=200, n_test=40, seed=0).save_npz(tmp_path / "planted.npz")
    other = train(
        f"npz:{npz}",
        "smallcnn",
        epochs=1,
        checkpoints=3,
        device="cpu",
        out=tmp_path / "planted",
        progress=False,
    )
    with pytest.raises(WhylookError, match=r"run `whylook explain .*` first"):
        compare(a, other.path, device="cpu")
    from whylook.explain import explain

    explain(other, analysis_size=100, k=8, device="cpu", progress=False)
    with pytest.raises(WhylookError, match="different classes"):
        compare(a, other.path, device="cpu")


def test_cli_reports_a_missing_run_in_one_line(tmp_path, capsys):
    from whylook.cli import main

    assert main(["compare", str(tmp_path / "nope"), str(tmp_path / "nope2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:")
    assert "\n" not in err
    assert err == f"error: run folder {tmp_path / 'nope'} does not exist"  # run A, named


def test_an_older_files_coefficient_of_too_few_separated_pairs_is_not_compared():
    """Files written before structure required 3 separated pairs may hold a coefficient of
    one; compare reads it as the summary and report do: not measurable."""

    def data(separated):
        order = [{"pair": ["a", str(i)], "separated_at_step": 5 if i < separated else None}
                 for i in range(6)]
        return {"learning_order": order,
                "learning_order_correlation": {"spearman": -0.866, "p_value": 0.03,
                                               "n_pairs": 6}}

    assert order_correlation_of(data(1)) == (1, None, None)
    assert order_correlation_of(data(2)) == (2, None, None)
    assert order_correlation_of(data(3)) == (3, -0.866, 0.03)


@pytest.mark.slow
@pytest.mark.parametrize("numbers", [2, 3])
def test_summary_report_and_compare_count_separated_pairs_alike(two_runs, tmp_path, numbers):
    """A hand-edited explanation.json whose separation steps are partly not numbers (a string,
    a bool, a missing field, NaN): the summary, the report and compare all count only the
    numbers, so the three agree on whether the coefficient is shown."""
    from whylook.explain import load_explanation
    from whylook.report import report

    a, b = two_runs
    edited = tmp_path / "edited"
    shutil.copytree(a, edited, ignore=shutil.ignore_patterns("compare", "report"))
    path = edited / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    order = exp["learning_order"]
    assert len(order) >= 7
    for i, entry in enumerate(order):
        entry["separated_at_step"] = 10 * (i + 1) if i < numbers else None
    order[numbers]["separated_at_step"] = "12"
    order[numbers + 1]["separated_at_step"] = True
    order[numbers + 2].pop("separated_at_step")
    order[numbers + 3]["separated_at_step"] = float("nan")
    exp["learning_order_correlation"] = {"spearman": -0.5, "p_value": 0.01,
                                         "n_pairs": len(order)}
    path.write_text(json.dumps(exp))

    summary = load_explanation(edited).summary()
    html = report(edited).read_text(encoding="utf-8")
    got = compare(edited, b, out=tmp_path / "c.json", device="cpu").data["learning_order"]
    if numbers < 3:
        assert "not measurable (2 pairs separated; at least 3 needed)" in summary
        assert "too few separated pairs: 2, at least 3 needed" in html
        assert got["correlation_a"] is None
    else:
        assert "Spearman(distinctness, separation checkpoint) = -0.500 (p = 0.01" in summary
        assert "Spearman ρ = -0.50 (p = 0.01" in html
        assert got["correlation_a"] == -0.5
