"""The examples in whylook's docstrings run and print what they show.

Examples that need a trained run folder are marked ``+SKIP`` in the docstring; the rest
(the stages' small worked examples) are executed here, module by module.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

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
