"""Progress bars for long work: on a terminal and in notebooks, silent in pipes and CI."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    if os.environ.get("WHYLOOK_PROGRESS") in {"0", "1"}:
        return os.environ["WHYLOOK_PROGRESS"] == "1"
    # A notebook's stderr is no terminal, but tqdm.auto draws its bars there.
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _tqdm() -> Any:
    """tqdm's bar class: tqdm.auto's choice, except in a notebook without ipywidgets.

    There tqdm.auto warns ("IProgress not found", once per session) and falls back to the
    text bar; whylook takes the text bar itself, without the warning, which would ask for
    a package that the run does not need: the text bar draws in a notebook too.
    """
    if "ipykernel" in sys.modules:
        try:
            importlib.import_module("ipywidgets")
        except ImportError:
            from tqdm.std import tqdm as text_bar

            return text_bar
    from tqdm.auto import tqdm

    return tqdm


def progress_bar(
    iterable: Iterable[T], *, desc: str, total: int | None = None, progress: bool | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when progress is wanted."""
    if not _enabled(progress):
        yield from iterable
        return
    yield from _tqdm()(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class StageBar:
    """A bar over the named stages of work that is no loop over items (fits one after
    another): ``start(name)`` counts the stage before as done and shows ``name`` beside the
    bar. Used as a context manager, it is closed also on an error (a notebook keeps the last
    traceback, and a bar it holds would push the next one down a line).

    >>> with StageBar("analysis", ["fit", "write"], progress=False) as bar:
    ...     bar.start("fit"); bar.start("write")
    """

    def __init__(self, desc: str, stages: Sequence[str], *, progress: bool | None) -> None:
        self._bar = None
        if _enabled(progress):
            self._bar = _tqdm()(total=len(stages), desc=desc, leave=False, dynamic_ncols=True)
        self._begun = False

    def start(self, name: str) -> None:
        if self._bar is None:
            return
        if self._begun:
            self._bar.update(1)
        self._begun = True
        self._bar.set_postfix_str(name)

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            if self._begun:
                self._bar.update(1)
            self._bar.close()
            self._bar = None
