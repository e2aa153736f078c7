"""Small text formats shared by the summary and the report."""

from __future__ import annotations


def floor_pct(rate: float) -> str:
    """A rate as a whole percentage, rounded down, so that a rate just under a 50% bar never
    prints as 50%.

    >>> floor_pct(0.497), floor_pct(0.7), floor_pct(1.0)
    ('49%', '70%', '100%')
    """
    return f"{int(rate * 100 + 1e-9)}%"
