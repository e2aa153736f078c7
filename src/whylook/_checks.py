"""Type tests shared by the argument checks of every stage.

``isinstance(True, int)`` holds, so a plain ``int`` test lets ``True`` through as a count
of 1; and a NumPy integer (``np.int64(8)``, what indexing an array gives) is no ``int``,
so that test also turns away a value a user reasonably passes. One test for each.
"""

from __future__ import annotations

import math
import numbers
from typing import TypeGuard


# TypeGuard[int]/[float]: what the caller may do with the value next (compare, int(), float()).
def is_whole(value: object) -> TypeGuard[int]:
    """An integer, Python's or NumPy's, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """A real number, Python's or NumPy's, and not a bool (NaN and inf included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole_valued(value: object) -> TypeGuard[float]:
    """A whole number, or a finite real number of whole value (``100.0``: a step computed
    as ``epoch * steps_per_epoch``, or read from a float array)."""
    return is_whole(value) or (is_number(value) and math.isfinite(value)
                               and float(value).is_integer())
