"""What a notebook user does with the Python API: the results of one call go straight into
the next, explanations are explored without reading private modules, and a slip gets a
one-line message instead of a character-by-character surprise."""

from __future__ import annotations

import builtins
import os
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import whylook
from _synthetic_run import make_synthetic_run
from _tiny_run import baseline, copy_run
from whylook import ExplainSettings, WhylookError, load_explanation, report
from whylook._progress import StageBar, _enabled, progress_bar
from whylook.run import RunFolder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_synthetic_run(tmp_path, classes=["a", "b"], k=4)


@pytest.fixture
def real_run(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A trained and explained run (the synthetic one has no checkpoints to open)."""
    return copy_run(baseline(tmp_path_factory)[1], tmp_path / "real", analysis=True)


def test_results_go_straight_into_the_next_call(real_run: Path) -> None:
    run = real_run
    exp = load_explanation(run)
    folder = RunFolder.open(run)
    assert load_explanation(folder).data == exp.data
    assert load_explanation(exp).data == exp.data
    page = run / "report" / "index.html"
    for given in (folder, exp):
        page.unlink(missing_ok=True)
        assert report(given) == page
        assert page.read_text().lstrip().lower().startswith("<!doctype html")


def test_explanations_compare_by_identity_and_hash(run: Path) -> None:
    a, b = load_explanation(run), load_explanation(run)
    assert a != b  # == on dicts of arrays would raise "truth value ... is ambiguous"
    assert a == a
    assert a in [b, a]
    assert len({a, b}) == 2


def test_explanation_helpers(run: Path) -> None:
    exp = load_explanation(run)
    entry = exp.data["classes_explained"][1]
    assert exp.for_class("b") == entry
    assert exp.for_class(1) == entry
    with pytest.raises(WhylookError, match=r"class 'c' is not one of the 2 classes \(a, b\)"):
        exp.for_class("c")
    assert exp.uncertain_prototypes == exp.data["uncertain_prototypes"]
    assert exp.learning_order == exp.data["learning_order"]
    index = exp.arrays["sample_index"]
    assert exp.row(int(index[5])) == 5
    assert exp.row(index[5]) == 5  # a NumPy integer, as indexing gives
    missing = int(np.setdiff1d(np.arange(index.max() + 2), index)[0])
    with pytest.raises(WhylookError, match=rf"training image {missing} is not in the analysis"):
        exp.row(missing)


def test_load_explanation_says_what_is_missing(run: Path, tmp_path: Path) -> None:
    with pytest.raises(WhylookError, match=r"run folder .*nope does not exist"):
        load_explanation(tmp_path / "nope")
    (run / "analysis" / "explanation.json").unlink()
    with pytest.raises(WhylookError, match=r"has no explanation yet; run `whylook explain"):
        load_explanation(run)


def test_one_string_is_one_value_not_its_characters(
    run: Path, real_run: Path, tmp_path: Path
) -> None:
    page = report(run, classes="all").read_text(encoding="utf-8")
    assert "Drawn in full" not in page
    page = report(run, classes="b").read_text(encoding="utf-8")
    assert "Drawn in full: the 1 of 2 classes asked for" in page
    with pytest.raises(WhylookError, match=r"unknown strategy 'nope'"):
        whylook.finetune(real_run, strategies="full,nope")
    with pytest.raises(WhylookError, match=r"not the one path 'a.pt'; pass \[first, ..., last\]"):
        whylook.import_checkpoints("a.pt", data="mnist5k", model="smallcnn",
                                   out=tmp_path / "imp")


def test_explain_settings_are_checked_when_made() -> None:
    with pytest.raises(WhylookError, match="k must be a whole number >= 2"):
        ExplainSettings(k=-5)
    with pytest.raises(WhylookError, match="support must be one of"):
        ExplainSettings(support="nonsense")
    with pytest.raises(WhylookError, match="precision"):
        ExplainSettings(precision="fp16")


def test_notebook_friendly_reprs_and_names(monkeypatch: pytest.MonkeyPatch) -> None:
    split = whylook.Split(np.zeros((5000, 1, 28, 28), np.uint8), np.zeros(5000, np.int64))
    assert repr(split) == "Split(images=uint8 (5000, 1, 28, 28), labels=int64 (5000,))"
    names = dir(whylook)
    assert {"explain", "__version__"} <= set(names)
    assert not {"importlib", "sys", "types", "Any", "TYPE_CHECKING"} & set(names)
    monkeypatch.delenv("WHYLOOK_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not _enabled(None)
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # a notebook's kernel is loaded
    assert _enabled(None)


def test_a_notebook_without_ipywidgets_gets_text_bars_and_no_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a Jupyter kernel tqdm.auto draws widget bars; without ipywidgets it warns
    ("IProgress not found") before taking the text bar, which whylook takes itself."""
    import tqdm
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.notebook  # all loaded, so that teardown puts them back

    # Forget tqdm's choice of bar, made once on import, so it is made again in the kernel.
    for name in ("auto", "autonotebook", "notebook"):
        monkeypatch.setattr(tqdm, name, getattr(tqdm, name))
        monkeypatch.delitem(sys.modules, f"tqdm.{name}")
    # What tqdm.autonotebook looks for: a Jupyter kernel's shell, no Qt console or Spyder.
    ipython = types.ModuleType("IPython")
    shell = type("ZMQInteractiveShell", (), {})()
    ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets: ImportError
    for key in list(os.environ):
        if key == "QT_API" or key.startswith("SPYDER"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("WHYLOOK_PROGRESS", raising=False)
    assert _enabled(None)  # a notebook shows bars by default
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(progress_bar(range(3), desc="shards", progress=None)) == [0, 1, 2]
        with StageBar("analysis", ["fit", "write"], progress=None) as bar:
            bar.start("fit")
            bar.start("write")
    assert [str(w.message) for w in caught] == []
    # The text bars, drawn on stderr (and cleared again: leave=False).
    err = capsys.readouterr().err
    assert "shards:   0%|          | 0/3" in err
    assert "analysis:   0%|" in err
    assert "1/2" in err
    assert "write]" in err


def test_an_explanations_arrays_are_read_only(run: Path) -> None:
    exp = load_explanation(run)
    with pytest.raises(ValueError, match="read-only"):
        exp.arrays["beta"] *= 2
    copy = exp.arrays["beta"].copy()  # a copy is the caller's own
    copy *= 2


def test_the_readme_says_what_an_in_place_edit_of_the_arrays_does(run: Path) -> None:
    """The Python API section's account of the arrays: its in-place edit, run as written,
    raises what it says, and a .copy() can be changed."""
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    api = text[text.index("The same from Python:"):text.index("## Speed and memory")]
    said = re.search(r"read-only views .*? an in-place edit \(`([^`]+)`\) raises `(\w+)`", api)
    assert said, "README's Python API section no longer says that the arrays are read-only"
    assert "take a `.copy()`" in api
    explanation = load_explanation(run)
    with pytest.raises(getattr(builtins, said[2]), match="read-only"):
        exec(said[1], {"explanation": explanation})
    mine = explanation.arrays["beta"].copy()
    mine *= 2
    np.testing.assert_array_equal(mine, 2 * explanation.arrays["beta"])


def test_for_class_takes_a_name_before_a_position(tmp_path: Path) -> None:
    from whylook.explain import Explanation

    names = ["1", "10", "2"]  # image-folder classes sort as text
    exp = Explanation(tmp_path, {"classes": names, "classes_explained": [
        {"class": c, "shared": [f"P-{i}"]} for i, c in enumerate(names)]}, {})
    assert exp.for_class(1)["class"] == "1"  # the class named 1, not the one at position 1
    assert exp.for_class("10")["class"] == "10"
    assert exp.for_class(2)["class"] == "2"


def test_an_explanation_made_by_hand_leaves_the_callers_arrays_writable(tmp_path: Path) -> None:
    from whylook.explain import Explanation

    beta = np.zeros((2, 3, 2), np.float32)
    exp = Explanation(tmp_path, {"classes": ["a", "b"]}, {"beta": beta})
    beta += 1  # the caller's array is still theirs
    assert exp.arrays["beta"][0, 0, 0] == 1  # a view of it, read-only
    assert not exp.arrays["beta"].flags.writeable
