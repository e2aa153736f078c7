"""The examples in whylook's docstrings run and print what they show.

The stages' small worked examples run module by module. Examples that train or read a
run folder are marked ``+SKIP`` (they take seconds to minutes); the slow test below runs
those of them that a user meets first, in order, in an empty folder, since each reads what
an earlier one wrote. ``compare``, ``finetune``, ``demo`` and ``import_checkpoints`` stay
skipped: they need two runs, minutes of fine-tuning or checkpoint files (their CLI tests
cover them, and tests/test_demo.py the demo).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import whylook

STAGES = ("prototypes", "saliency", "intensity", "patterns", "mapping", "structure")
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(whylook.__path__, prefix="whylook.")
    if not info.name.endswith("__main__")
)


def test_every_stage_module_is_collected() -> None:
    # A rename that empties MODULES would silently turn every example test into nothing.
    for stage in STAGES:
        assert f"whylook.{stage}" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
    if name.removeprefix("whylook.") in STAGES:
        assert result.attempted > 0, f"{name} lost its runnable examples"


# (module, docstring) in the order they run: train writes runs/quick and runs/tiny, the
# package example trains and explains runs/a, the rest read runs/a.
RUN_EXAMPLES = (
    ("whylook.train", "whylook.train"),
    ("whylook.train", "whylook.train.train"),
    ("whylook", "whylook"),
    ("whylook.explain", "whylook.explain.explain"),
    ("whylook.run", "whylook.run"),
    ("whylook.report", "whylook.report.report"),
)


@pytest.mark.slow
def test_examples_on_trained_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WHYLOOK_PROGRESS", "0")
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for module_name, test_name in RUN_EXAMPLES:
        module = importlib.import_module(module_name)
        [test] = [t for t in finder.find(module) if t.name == test_name]
        assert any(ex.options.get(doctest.SKIP) for ex in test.examples), test_name
        for ex in test.examples:
            ex.options.pop(doctest.SKIP, None)
        result = runner.run(test)
        assert result.failed == 0, f"{result.failed} example(s) of {test_name} failed"
    assert (tmp_path / "runs" / "a" / "report" / "index.html").is_file()
