"""Progress bars for long work: on a terminal and in notebooks, silent in pipes and CI."""

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
    # A notebook's stderr is no terminal, but tqdm.auto draws its bars there.
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(
    iterable: Iterable[T], *, desc: str, total: int | None = None, progress: bool | None = None
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when progress is wanted."""
    if not _enabled(progress):
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
