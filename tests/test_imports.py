"""The package's public names: each the object its module defines, loaded on first use."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import pytest

import whylook

HEAVY = ("torch", "sklearn", "scipy", "matplotlib", "jinja2")


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (a clean import state) and return its output."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300)
    return done.stdout.strip()


def test_importing_the_package_or_asking_for_help_loads_no_heavy_library():
    loaded = _fresh(
        "import sys, contextlib, io, whylook\n"
        "from whylook.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert loaded == "[]"


def test_python_m_whylook_is_the_program():
    done = subprocess.run([sys.executable, "-m", "whylook", "report", "/nonexistent-run"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert done.stderr.count("\n") == 1
    usage = subprocess.run([sys.executable, "-m", "whylook", "--help"], capture_output=True,
                           text=True, timeout=300, check=True).stdout
    assert "train" in usage
    assert "explain" in usage


@pytest.mark.parametrize("name", whylook.__all__)
def test_every_public_name_is_its_modules_object(name):
    value = getattr(whylook, name)
    if name == "__version__":
        assert isinstance(value, str)
        return
    assert not isinstance(value, types.ModuleType), name
    home = importlib.import_module(value.__module__)
    assert getattr(home, name) is value
    assert name in dir(whylook)


def test_functions_named_like_their_modules_survive_any_import_order():
    # Submodules first (as a user's `from whylook.explain import ExplainSettings` does),
    # the package's names after: each must still be the function, not the module.
    out = _fresh(
        "import whylook.explain, whylook.train, whylook.compare\n"
        "from whylook.report import report as r\n"
        "from whylook.finetune import FinetuneResult\n"
        "import sys, whylook\n"
        "names = ('explain', 'train', 'report', 'compare', 'finetune')\n"
        "print([type(getattr(whylook, n)).__name__ for n in names])\n"
        "print(whylook.report is r, sys.modules['whylook.report'])"
    )
    kinds, same = out.splitlines()
    assert kinds == "['function', 'function', 'function', 'function', 'function']"
    assert same.startswith("True <module 'whylook.report'")


def test_the_listed_names_are_the_loadable_ones():
    # __all__ stays a literal list for linters and type checkers; it must name exactly what
    # the package loads on demand.
    assert sorted(whylook.__all__) == sorted(["__version__", *whylook._EXPORTS])


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'explian'"):
        _ = whylook.explian  # type: ignore[attr-defined]


def test_every_cli_argument_says_what_it_is_in_help():
    import argparse

    from whylook.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, parser in sub.choices.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert sorted(sub.choices) == ["compare", "demo", "explain", "finetune", "import",
                                   "report", "train"]
    assert missing == []


def test_a_report_of_a_finished_run_loads_no_torch_scipy_or_sklearn(tmp_path):
    """Reading a run needs none of the analysis libraries: ``whylook report`` pays for
    matplotlib and jinja2 only (importing torch, scipy.stats and scikit-learn cost 2.5 s
    of the command's 6 s on the demo)."""
    from _synthetic_run import make_synthetic_run

    run = make_synthetic_run(tmp_path, classes=["a", "b"], k=4)
    loaded = _fresh(
        "import sys, contextlib, io\n"
        "from whylook.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main(['report', {str(run)!r}])\n"
        f"print(code, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert loaded == "0 ['matplotlib', 'jinja2']"
    assert (run / "report" / "index.html").is_file()
