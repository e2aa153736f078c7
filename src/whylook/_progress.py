"""Progress bars for long work: shown on a terminal, silent in pipes, tests and CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    if os.environ.get("WHYLOOK_PROGRESS") in {"0", "1"}:
        return os.environ["WHYLOOK_PROGRESS"] == "1"
    return sys.stderr.isatty()


def progress_bar(
    iterable: Iterable[T], *, desc: str, total: int | None = None, progress: bool | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when progress is wanted."""
    if not _enabled(progress):
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
