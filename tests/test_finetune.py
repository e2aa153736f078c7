"""Perturbation fine-tuning: the curated-set rule, seeds, strategies, and a small real run."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from whylook.errors import WhylookError
from whylook.finetune import (
    CuratedSet,
    FinetuneResult,
    StrategyResult,
    choose_pair,
    confusion_count,
    confusion_matrix,
    curated_mask,
    parse_strategy,
    stage_order,
)

# --------------------------------------------------------------------------- hand-made


def test_confusion_count_on_a_hand_made_matrix():
    # rows = true class, columns = predicted class
    c = np.array(
        [
            [980, 0, 0, 0],
            [0, 1130, 3, 2],
            [1, 7, 1020, 4],  # 7 twos predicted as one, 4 as three
            [0, 0, 9, 1001],  # 9 threes predicted as two
        ]
    )
    assert confusion_count(c, 2, 3) == 4 + 9
    assert confusion_count(c, 3, 2) == 13  # symmetric in the pair
    assert confusion_count(c, 1, 2) == 3 + 7
    assert confusion_count(c, 0, 3) == 0
    with pytest.raises(WhylookError):
        confusion_count(c, 2, 2)


def test_confusion_matrix_rows_are_true_classes():
    c = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 0]), 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]
    assert confusion_count(c, 0, 2) == 2


def test_curated_rule_removes_exactly_active_samples_of_the_swing_classes():
    labels = np.array([2, 2, 7, 7, 1, 1, 2, 7])
    act = np.zeros((8, 3))  # activity by the explanation's rule
    act[:, 0] = [0.10, 0.09, 0.5, 0.0, 0.9, 0.2, 0.0, 0.0]  # P-0 swings 2<->7
    act[:, 1] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.1]  # P-1 swings 1<->7
    keep, removed = curated_mask(labels, act, [(0, 2, 7)], 0.1)
    # 0: a 2 at exactly the threshold (>=) -> out; 1: below -> in; 2: a 7 -> out;
    # 4, 5: ones that contain P-0, but 1 is not a class P-0 swings between -> in.
    assert np.flatnonzero(~keep).tolist() == [0, 2]
    assert removed == {0: 2}
    keep_any, _ = curated_mask(labels, act, [(0, 2, 7)], 0.1, only_swing_classes=False)
    assert np.flatnonzero(~keep_any).tolist() == [0, 2, 4, 5]
    keep2, removed2 = curated_mask(labels, act, [(0, 2, 7), (1, 1, 7)], 0.1)
    assert np.flatnonzero(~keep2).tolist() == [0, 2, 7]  # row 6 is a 2: P-1 is about 1<->7
    assert removed2 == {0: 2, 1: 1}
    with pytest.raises(WhylookError, match="activity must have shape"):
        curated_mask(labels, act[:3], [(0, 2, 7)], 0.1)


def test_seed_fixes_the_order_and_nothing_else():
    keep = np.random.default_rng(0).random(500) > 0.2
    a = stage_order(500, seed=3, stage=0)
    assert np.array_equal(a, stage_order(500, 3, 0))  # same seed: same order
    assert sorted(a.tolist()) == list(range(500))  # a permutation of every row
    assert not np.array_equal(a, stage_order(500, 4, 0))  # another seed: another order
    assert not np.array_equal(a, stage_order(500, 3, 1))  # the second stage reshuffles
    cur = stage_order(500, 3, 0, keep)
    assert cur.tolist() == [i for i in a.tolist() if keep[i]]  # curated = full minus removed
    assert keep[cur].all()
    assert len(cur) == keep.sum()


def test_strategies_parse_and_bad_ones_are_refused():
    assert parse_strategy("curated>full") == ("curated", "full")
    assert parse_strategy("curated→curated") == ("curated", "curated")
    for bad in ("curated>", "fulll", "full>>curated", ""):
        with pytest.raises(WhylookError, match="unknown strategy"):
            parse_strategy(bad)


def _fake_explanation(uncertain):
    return SimpleNamespace(
        data={"classes": [str(c) for c in range(4)], "uncertain_prototypes": uncertain}
    )


def test_pair_choice_auto_user_and_errors():
    unc = [
        {"id": "P-3", "classes": ["1", "2"], "swings": 2},
        {"id": "P-5", "classes": ["3", "0"], "swings": 4},
        {"id": "P-9", "classes": ["0", "3"], "swings": 2},
    ]
    conf = np.diag([100, 100, 100, 100])
    conf[1, 2], conf[2, 1] = 6, 5  # 11 confusions for (1, 2)
    conf[0, 3] = 9  # 9 for (0, 3)
    (a, b), protos, reason = choose_pair(_fake_explanation(unc), conf, "auto")
    assert (a, b) == (1, 2)
    assert [u["id"] for u in protos] == ["P-3"]
    assert "11" in reason
    (a, b), protos, _ = choose_pair(_fake_explanation(unc), conf, "3,0")
    assert (a, b) == (0, 3)
    assert [u["id"] for u in protos] == ["P-5", "P-9"]
    with pytest.raises(WhylookError, match="not a class"):
        choose_pair(_fake_explanation(unc), conf, "1,x")
    with pytest.raises(WhylookError, match="no uncertain prototype swings between 0 and 1"):
        choose_pair(_fake_explanation(unc), conf, "0,1")
    with pytest.raises(WhylookError, match="two different"):
        choose_pair(_fake_explanation(unc), conf, "2,2")
    with pytest.raises(WhylookError, match="found no uncertain prototypes") as info:
        choose_pair(_fake_explanation([]), conf, "auto")
    assert "`--min-swings 1`" in str(info.value)  # the default rule: the looser one is named
    strict_one = _fake_explanation([])
    strict_one.data["structure_settings"] = {"min_swings": 1}
    with pytest.raises(WhylookError, match="found no uncertain prototypes") as info:
        choose_pair(strict_one, conf, "auto")
    assert "--min-swings" not in str(info.value)


def test_table_reports_sample_std_and_paired_differences(tmp_path):
    keep = np.ones(10, bool)
    keep[:2] = False
    curated = CuratedSet(
        pair=("2", "7"),
        prototypes=("P-4",),
        rule={"active_threshold": 0.1, "only_swing_classes": True},
        keep=keep,
        removed_by_class={"2": 1, "7": 1},
        removed_by_prototype={"P-4": 2},
        class_sizes={"2": 5, "7": 5},
    )
    ff = StrategyResult(
        ("full", "full"), (0, 1, 2), (0.98, 0.99, 0.97), (10, 12, 8), (0.1, 0.1, 0.1)
    )
    cf = StrategyResult(
        ("curated", "full"), (0, 1, 2), (0.99, 0.99, 0.98), (8, 9, 7), (0.1, 0.1, 0.1)
    )
    res = FinetuneResult(
        path=tmp_path / "finetune.json",
        classes=tuple("0123456789"),
        pair=("2", "7"),
        pair_reason="user",
        curated=curated,
        start={"index": 3, "step": 100, "test_accuracy": 0.97, "confusions": 11},
        strategies=(ff, cf),
        settings={"seeds": [0, 1, 2], "optimizer": "adam", "lr": 1e-4, "batch_size": 128},
        seconds=1.0,
    )
    rows = {r["name"]: r for r in res.rows()}
    assert rows["full>full"]["confusions_mean"] == pytest.approx(10.0)
    assert rows["full>full"]["confusions_std"] == pytest.approx(2.0)  # ddof=1, not 1.633
    assert rows["curated>full"]["accuracy_mean"] == pytest.approx(98.6667, abs=1e-3)
    paired = res.paired("curated>full")
    assert paired["confusions"]["mean"] == pytest.approx(-2.0)
    text = res.table()
    assert "curated→full" in text
    assert "10.00 ± 2.00" in text
    assert "removed 2 of 10" in text
    assert "| full→full |" in res.markdown()
    assert res.to_json()["schema"] == "whylook.finetune/1"
    json.dumps(res.to_json(), allow_nan=False)


# --------------------------------------------------------------------------- small real run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """smallcnn on mnist5k, 1 epoch, explained; with an uncertain prototype guaranteed.

    A one-epoch run may find no uncertain prototype. The fine-tuning machinery is what
    is under test here, so when none is found the prototype most active in both 4s and 9s
    is declared uncertain between them in ``explanation.json``.
    """
    from _tiny_run import small_mnist_run

    out = tmp_path_factory.mktemp("finetune") / "run"
    exp = small_mnist_run(out)
    if not exp.data["uncertain_prototypes"]:
        labels, active = exp.arrays["labels"], exp.arrays["active"]
        both = np.minimum(active[labels == 4].mean(0), active[labels == 9].mean(0))
        p = int(np.argmax(both))
        data = dict(exp.data)
        data["uncertain_prototypes"] = [
            {
                "id": f"P-{p}",
                "classes": ["4", "9"],
                "swings": 2,
                "steps": [1, 2],
                "checkpoints": [1, 2],
                "favoured": [None, "4", "9"],
            }
        ]
        from whylook._io import write_json

        write_json(out / "analysis" / "explanation.json", data)
    return out


def _train_activity(run_path: Path) -> tuple[np.ndarray, np.ndarray, float, list]:
    """The rule's inputs, recomputed independently of finetune's cache: Grad-CAM and
    features of every training sample, in other batches, and the explanation's activity
    rule applied to them."""
    from whylook.explain import load_explanation
    from whylook.finetune import load_prototypes
    from whylook.intensity import activity
    from whylook.run import RunFolder
    from whylook.saliency import grad_cam

    run = RunFolder.open(run_path)
    exp = load_explanation(run_path)
    protos = load_prototypes(run, exp, device="cpu")
    train = run.data().train
    model = run.load_model(len(run.checkpoints) - 1, device="cpu")
    res = grad_cam(
        model, exp.data["layer"], train.images, train.labels, batch_size=97, return_features=True
    )
    rule = exp.data["structure_settings"]["active_rule"]
    act = activity(res.saliency, protos.assign(res.features), protos.k, rule=rule)
    thr = exp.data["structure_settings"]["active_threshold"]
    return train.labels, act, thr, exp.data["uncertain_prototypes"]


@pytest.mark.slow
def test_curated_set_excludes_exactly_the_samples_the_rule_says(small_run):
    from whylook.finetune import finetune

    res = finetune(
        small_run, pair="auto", strategies=["curated"], seeds=[0], device="cpu", progress=False
    )
    labels, act, thr, unc = _train_activity(small_run)
    a, b = res.pair
    ids = [int(u["id"][2:]) for u in unc if sorted(u["classes"]) == sorted([a, b])]
    expect_removed = np.zeros(len(labels), bool)
    for p in ids:
        expect_removed |= (act[:, p] >= thr) & np.isin(labels, [int(a), int(b)])
    # Independent recomputation; only a sample on the threshold's float edge may differ.
    edge = np.zeros(len(labels), bool)
    for p in ids:
        edge |= np.abs(act[:, p] - thr) < 1e-5
    diff = (~res.curated.keep) != expect_removed
    assert not (diff & ~edge).any()
    assert res.curated.n_removed == int((~res.curated.keep).sum()) > 0
    removed_labels = set(labels[~res.curated.keep].tolist())
    assert removed_labels <= {int(a), int(b)}
    assert sum(res.curated.removed_by_class.values()) == res.curated.n_removed
    # On the analysis rows the rule agrees with the explanation's own `active` matrix.
    assert res.curated.explanation_agreement == pytest.approx(1.0, abs=0.005)
    # And a curated epoch never visits a removed sample.
    order = stage_order(len(labels), 0, 0, res.curated.keep)
    assert res.curated.keep[order].all()
    on_disk = json.loads((small_run / "finetune" / "finetune.json").read_text())
    assert on_disk["curated"]["n_removed"] == res.curated.n_removed
    assert (small_run / "finetune" / "finetune.md").is_file()


@pytest.mark.slow
def test_strategies_start_from_the_final_checkpoint_and_seeds_only_change_the_order(
    small_run, monkeypatch
):
    from whylook.finetune import finetune
    from whylook.run import RunFolder

    loaded = []
    original = RunFolder.load_model

    def spy(self, index, *args, **kwargs):
        loaded.append(index)
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(RunFolder, "load_model", spy)
    strategies = ["full>full", "curated>full", "full", "curated"]
    res = finetune(small_run, strategies=strategies, seeds=[0, 1], device="cpu", progress=False)
    last = len(RunFolder.open(small_run).checkpoints) - 1
    assert loaded
    assert set(loaded) == {last}
    by = {s.name: s for s in res.strategies}
    # Seeds change the data order, so results differ between seeds ...
    assert by["full>full"].loss[0] != by["full>full"].loss[1]
    # ... and the same seed reproduces them exactly, computed alone or together.
    for entry in (small_run / "finetune" / "cache").glob("*-seed*.json"):
        entry.unlink()
    again = finetune(
        small_run, strategies=["full", "curated>full"], seeds=[1], device="cpu", progress=False
    )
    by_again = {s.name: s for s in again.strategies}
    assert by_again["full"].loss[0] == by["full"].loss[1]
    assert by_again["full"].accuracy[0] == by["full"].accuracy[1]
    assert by_again["curated>full"].confusions[0] == by["curated>full"].confusions[1]
    # The curated set is a property of the run, not of the seed.
    assert np.array_equal(again.curated.keep, res.curated.keep)


@pytest.mark.slow
def test_a_callers_inference_mode_and_random_state_are_left_alone(small_run, tmp_path):
    import torch

    ft = importlib.import_module("whylook.finetune")
    inside_run, outside_run = (
        shutil.copytree(small_run, tmp_path / name, ignore=shutil.ignore_patterns("finetune"))
        for name in ("inside", "outside")
    )
    kwargs = {"strategies": ["full>full"], "seeds": [0], "device": "cpu", "progress": False}
    with torch.inference_mode():
        inside = ft.finetune(inside_run, **kwargs)
    torch.manual_seed(12345)
    outside = ft.finetune(outside_run, **kwargs)
    # The caller's random state is theirs: fine-tuning seeds torch inside, then puts it back.
    after = torch.rand(3)
    torch.manual_seed(12345)
    assert torch.equal(after, torch.rand(3))
    assert inside.strategies == outside.strategies
    assert inside.strategies[0].accuracy[0] > 0.5  # it trained


@pytest.mark.slow
def test_another_curated_set_reruns_only_the_strategies_that_use_it(small_run, monkeypatch):
    # The module, not the function that whylook/__init__ binds to the same name.
    ft = importlib.import_module("whylook.finetune")

    strategies = ["full>full", "curated>full"]
    first = ft.finetune(small_run, strategies=strategies, seeds=[0], device="cpu", progress=False)
    visited = []
    original = ft._train_epoch

    def counting(model, opt, images, labels, order, *args):
        visited.append(len(order))
        return original(model, opt, images, labels, order, *args)

    monkeypatch.setattr(ft, "_train_epoch", counting)
    res = ft.finetune(
        small_run,
        strategies=strategies,
        seeds=[0],
        only_swing_classes=False,  # also samples of other classes: another curated set
        device="cpu",
        progress=False,
    )
    by_first = {s.name: s for s in first.strategies}
    by = {s.name: s for s in res.strategies}
    assert by["full>full"] == by_first["full>full"]  # from the cache: it has no curated stage
    if np.array_equal(res.curated.keep, first.curated.keep):
        assert visited == []
    else:
        # Only curated>full ran: a curated epoch, then a full one.
        assert visited == [res.curated.n_curated, res.curated.n_full]
        assert res.curated.n_removed > first.curated.n_removed


@pytest.mark.slow
def test_cli_finetune_refuses_bad_pairs_in_one_line(small_run, capsys):
    from whylook.cli import main

    assert main(["finetune", str(small_run), "--pair", "4,x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:")
    assert "not a class" in err
    assert "\n" not in err
    assert main(["finetune", str(small_run), "--strategies", "full>half"]) == 2
    assert "unknown strategy" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"lr": 0.0}, "lr must be a positive number, not 0.0"),
        ({"lr": float("nan")}, "lr must be a positive number, not nan"),
        ({"lr": "fast"}, "lr must be a positive number, not 'fast'"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"seeds": 10**23}, f"from 1 to 1000 or a list of seeds, not {10**23}"),
        ({"seeds": 0}, "seeds must be a count from 1 to 1000 or a list of seeds, not 0"),
        ({"seeds": [1, 1]}, "distinct whole numbers from 0 to 4294967295, not [1, 1]"),
        ({"seeds": [-1]}, "distinct whole numbers from 0 to 4294967295, not [-1]"),
        ({"seeds": ["a"]}, "distinct whole numbers from 0 to 4294967295, not ['a']"),
    ],
)
def test_bad_settings_are_refused_before_any_work(small_run, monkeypatch, option, message):
    ft = importlib.import_module("whylook.finetune")

    # Refused up front: the training activity (minutes on a large run) is never computed.
    def never(*_a, **_k):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(ft, "training_activity", never)
    with pytest.raises(WhylookError, match=re.escape(message)):
        ft.finetune(small_run, pair="auto", device="cpu", **{"seeds": 1, **option})


@pytest.mark.slow
def test_a_diverged_fine_tuning_is_a_one_line_error_and_writes_nothing(small_run):
    from whylook.finetune import finetune

    def results() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (small_run / "finetune").glob("finetune.*")}

    before = results()
    with pytest.raises(WhylookError, match=r"fine-tuning diverged .*; lower --lr") as info:
        finetune(small_run, pair="auto", seeds=1, lr=1e30, strategies=["full"], device="cpu",
                 progress=False)
    assert "\n" not in str(info.value)
    assert results() == before


def test_finetune_needs_an_explanation(tmp_path):
    from whylook.finetune import require_explanation

    with pytest.raises(WhylookError, match="is not a whylook run folder"):
        require_explanation(tmp_path)
    (tmp_path / "run.json").write_text("{}")  # a run folder, not yet explained
    with pytest.raises(WhylookError,
                       match=r"has no explanation yet; run `whylook explain .*` first"):
        require_explanation(tmp_path)


@pytest.mark.slow
def test_a_finetune_killed_between_its_two_files_leaves_no_old_table(small_run, monkeypatch):
    """Last in this module: it leaves the fixture's run without finetune.md."""
    from whylook.finetune import finetune

    run = small_run
    out = run / "finetune"
    out.mkdir(exist_ok=True)
    (out / "finetune.md").write_text("| an older run's table |\n")
    (out / ".finetune.md.abc.tmp").write_text("partial")
    (out / "cache").mkdir(exist_ok=True)
    (out / "cache" / ".activity-s0000-x.npz.y.tmp").write_bytes(b"partial")
    ft = importlib.import_module("whylook.finetune")

    def killed(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    # The final write: its content is made after the old table is gone (the cache's own
    # JSON files are written earlier, through write_json too).
    monkeypatch.setattr(ft.FinetuneResult, "to_json", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(run, pair="auto", seeds=1, strategies=["full"], device="cpu", progress=False)
    assert not (out / "finetune.md").exists()
    assert not list(out.glob(".*.tmp"))
    assert not list((out / "cache").glob(".*.tmp"))


def test_the_default_rate_follows_the_optimizer_used() -> None:
    """An imported run records no optimizer or rate: --optimizer sgd gets SGD's rate, not
    Adam's; a run's own rate is for its own optimizer only."""
    from whylook.finetune import _training_defaults

    imported = SimpleNamespace(config={})
    assert _training_defaults(imported, None) == ("adam", 0.001, 128)
    assert _training_defaults(imported, "sgd") == ("sgd", 0.01, 128)
    trained = SimpleNamespace(config={"optimizer": "adam", "lr": 0.003, "batch_size": 64})
    assert _training_defaults(trained, None) == ("adam", 0.003, 64)
    assert _training_defaults(trained, "SGD") == ("sgd", 0.01, 64)


def test_evaluate_takes_devices_and_counts_as_the_rest_of_whylook() -> None:
    import torch

    from whylook.finetune import evaluate

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():  # logits (1, 0) for every image: class 0 predicted throughout
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([1.0, 0.0]))
    images, labels = np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 1])
    assert evaluate(net, images, labels, 2, device="auto")[2].sum() == 3
    # Two batches (2 + 1): the loss is the mean over samples, rows are true classes.
    acc, loss, conf = evaluate(net, images, labels, 2, batch_size=2)
    assert conf.tolist() == [[1, 0], [2, 0]]
    assert acc == pytest.approx(1 / 3)
    assert loss == pytest.approx((np.log1p(np.exp(-1.0)) + 2 * np.log1p(np.exp(1.0))) / 3)
    with pytest.raises(WhylookError, match="unknown device 'gpu'"):
        evaluate(net, images, labels, 2, device="gpu")
    with pytest.raises(WhylookError, match="batch_size must be a whole number >= 1, not True"):
        evaluate(net, images, labels, 2, batch_size=True)
