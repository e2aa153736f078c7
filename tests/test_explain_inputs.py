"""explain's settings and its writes: checked before any work, honoured, and a failure at
the end leaves the previous analysis whole."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from whylook.errors import WhylookError
from whylook.explain import ExplainSettings, explain
from whylook.train import MAX_SEED


@pytest.fixture
def run(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _tiny_run import baseline, copy_run

    _, reference = baseline(tmp_path_factory)
    return copy_run(reference, tmp_path / "run", analysis=True)


def test_a_seed_beyond_32_bits_is_refused_before_any_work(run: Path) -> None:
    with pytest.raises(WhylookError, match=f"seed must be a whole number in 0..{MAX_SEED}, not "
                       f"{MAX_SEED + 1}"):
        explain(run, seed=MAX_SEED + 1, device="cpu", progress=False)


def test_the_settings_seed_is_used_unless_the_keyword_is_given(run: Path) -> None:
    exp = explain(run, settings=ExplainSettings(seed=3), device="cpu",
                  progress=False)
    assert exp.data["settings"]["seed"] == 3
    exp = explain(run, seed=4, settings=ExplainSettings(seed=3),
                  device="cpu", progress=False)
    assert exp.data["settings"]["seed"] == 4


def test_a_failure_to_write_the_explanation_keeps_the_previous_one(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ex = importlib.import_module("whylook.explain")

    analysis = run / "analysis"
    before = {name: (analysis / name).read_bytes() for name in ("explanation.json", "arrays.npz")}

    def unwritable(_obj: object) -> bytes:
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(ex, "json_bytes", unwritable)
    with pytest.raises(ValueError, match="not JSON compliant"):
        explain(run, seed=1, device="cpu", progress=False)
    after = {name: (analysis / name).read_bytes() for name in before}
    assert after == before
    assert json.loads(after["explanation.json"])["settings"]["seed"] == 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda e: e.pop("classes_explained"), "explanation.json has no list 'classes_explained'"),
        (lambda e: e["learning_order"].append({"pair": ["a"]}),
         "a learning_order entry is malformed"),
        (lambda e: e.update(layer=None), "explanation.json has no str 'layer'"),
    ],
)
def test_compare_and_finetune_refuse_a_damaged_explanation_in_one_line(
    run: Path, damage, message: str
) -> None:
    from whylook.compare import compare
    from whylook.finetune import finetune

    path = run / "analysis" / "explanation.json"
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    for call in (lambda: compare(run, run, device="cpu"),
                 lambda: finetune(run, seeds=1, device="cpu", progress=False)):
        with pytest.raises(WhylookError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
        assert f"rerun `whylook explain {run}`" in str(info.value)


def test_an_explanation_replaced_while_it_is_read_is_read_again(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explain that rewrites the files between the reads of explanation.json and
    arrays.npz could pair the old JSON with the new arrays: such a read is repeated."""
    from whylook._io import write_bytes

    ex = importlib.import_module("whylook.explain")
    path = run / "analysis" / "explanation.json"
    real = ex._read_explanation
    calls = []

    def replaced_during(*args: object):
        calls.append(1)
        result = real(*args)
        if len(calls) <= times:
            write_bytes(path, path.read_bytes())  # a new file in place, as explain writes
        return result

    monkeypatch.setattr(ex, "_read_explanation", replaced_during)
    times = 1
    assert ex.load_explanation(run).data["schema"] == ex.SCHEMA
    assert len(calls) == 2
    calls.clear()
    times = 99
    with pytest.raises(WhylookError, match="kept changing while it was read"):
        ex.load_explanation(run)
    assert len(calls) == 3
