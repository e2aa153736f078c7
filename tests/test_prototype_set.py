"""The prototype set and the final checkpoint's single pass.

METHOD Step 1: the prototype set is the analysis set by default and can be larger. whylook
nests the two, so the final checkpoint's Grad-CAM pass supplies the features of both: by
default no separate feature pass runs, and whatever the cache holds, the result equals a
fresh run's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import whylook.saliency
from _tiny_run import assert_same_arrays, baseline, copy_run, load_arrays
from whylook.explain import explain, prototype_rows, stratified_rows


@pytest.mark.parametrize("size", [1, 7, 30, 31, 45, 60])
def test_prototype_rows_nest_with_the_analysis_set(size: int) -> None:
    labels = np.repeat(np.arange(3), 20)
    rows = stratified_rows(labels, 30, seed=0)
    proto = prototype_rows(labels, rows, size, seed=0)
    assert proto.size == size == np.unique(proto).size
    assert np.all(np.diff(proto) > 0)
    inner, outer = (proto, rows) if size <= rows.size else (rows, proto)
    assert np.isin(inner, outer).all()
    if size == rows.size:
        assert np.array_equal(proto, rows)
    counts = np.bincount(labels[proto], minlength=3)
    assert counts.max() - counts.min() <= 1  # stratified: the classes are equal here


def test_prototype_rows_larger_set_is_stratified_in_what_it_adds() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    rows = stratified_rows(labels, 10, seed=0)
    proto = prototype_rows(labels, rows, 60, seed=0)
    added = np.setdiff1d(proto, rows)
    assert np.bincount(labels[added], minlength=2).tolist() == [40, 10]


def _count_feature_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = whylook.saliency.layer_features

    def counting(*args, **kwargs):
        calls.append(len(kwargs["rows"]) if kwargs.get("rows") is not None else -1)
        return real(*args, **kwargs)

    monkeypatch.setattr(whylook.saliency, "layer_features", counting)
    return calls


_SETTINGS = {"k": 5, "analysis_size": 60, "seed": 0, "device": "cpu", "progress": False}


def _explain_a_copy(tmp_path_factory, tmp_path, monkeypatch, **settings):
    """Explain a fresh copy of the baseline run, counting feature passes of the final model:
    ``(reference run, the copy, its Explanation, rows per feature pass)``."""
    _, reference = baseline(tmp_path_factory)
    calls = _count_feature_passes(monkeypatch)
    run = copy_run(reference, tmp_path / "run")
    return reference, run, explain(run, **{**_SETTINGS, **settings}), calls


def test_default_explain_runs_the_final_model_once(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, run, result, calls = _explain_a_copy(tmp_path_factory, tmp_path, monkeypatch)
    assert calls == [], "a feature pass ran although the Grad-CAM pass had the features"
    assert np.array_equal(result.arrays["prototype_rows"], result.arrays["sample_index"])
    assert_same_arrays(load_arrays(run), load_arrays(reference))


def test_a_larger_prototype_set_passes_over_only_the_added_rows(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, result, calls = _explain_a_copy(tmp_path_factory, tmp_path, monkeypatch,
                                          analysis_size=30, prototype_size=50)
    assert calls == [20]
    a = result.arrays
    assert np.isin(a["sample_index"], a["prototype_rows"]).all()
    assert a["prototype_rows"].size == 50


def test_a_smaller_prototype_set_is_fed_from_the_same_pass(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, run, result, calls = _explain_a_copy(tmp_path_factory, tmp_path, monkeypatch,
                                                    prototype_size=30)
    assert calls == []
    a = result.arrays
    assert a["prototype_rows"].size == 30
    assert np.isin(a["prototype_rows"], a["sample_index"]).all()
    np.testing.assert_array_equal(a["saliency"], load_arrays(reference)["saliency"])
    # The PCA and K-Means saw the 30 rows' positions, no more.
    (fitted,) = (run / "analysis" / "cache").glob("prototypes-*.npz")
    h, w = a["assignments"].shape[1:]
    with np.load(fitted) as z:
        assert int(z["counts"][1]) == 30 * h * w  # (k, n_vectors, n_fit_vectors)


@pytest.mark.parametrize("cached", ["saliency only", "prototypes only"])
def test_any_mix_of_cached_and_fresh_stages_equals_a_fresh_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    cached: str,
) -> None:
    """Saliency shards cached but not the prototypes (another K ran first), or the
    prototypes cached but not the saliency: the same arrays as a run from scratch, and the
    final model runs over the analysis set at most once."""
    _, reference = baseline(tmp_path_factory)
    settings = _SETTINGS
    run = copy_run(reference, tmp_path / "run")
    cache = run / "analysis" / "cache"
    if cached == "saliency only":
        explain(run, **{**settings, "k": 4})
    else:
        explain(run, **settings)
        for shard in cache.glob("saliency-*.npz"):
            shard.unlink()
    assert any(cache.glob("saliency-*.npz")) == (cached == "saliency only")
    calls = _count_feature_passes(monkeypatch)
    explain(run, **settings)
    # Cached saliency: one feature pass serves the prototypes and the assignments.
    assert calls == ([60] if cached == "saliency only" else [])
    assert_same_arrays(load_arrays(run), load_arrays(reference))


def test_past_the_held_features_budget_a_feature_pass_assigns_the_same(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # whylook.explain the attribute is the function; the module is in sys.modules.
    module = sys.modules["whylook.explain"]
    baseline(tmp_path_factory)  # the reference is made with the real budget
    monkeypatch.setattr(module, "_HELD_FEATURES_BYTES", 0)
    reference, run, _, calls = _explain_a_copy(tmp_path_factory, tmp_path, monkeypatch)
    assert calls == [60]  # the assignments' own pass; the prototypes still shared the first
    assert_same_arrays(load_arrays(run), load_arrays(reference))
