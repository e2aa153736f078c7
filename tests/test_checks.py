"""The shared argument tests: a bool is no count, a NumPy integer is one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from whylook import WhylookError, grad_cam
from whylook._checks import is_number, is_whole, is_whole_valued
from whylook.patterns import find_patterns
from whylook.prototypes import PrototypeFinder
from whylook.structure import StructureSettings


@pytest.mark.parametrize(("value", "whole", "number"), [
    (3, True, True), (np.int64(3), True, True), (np.uint8(3), True, True),
    (True, False, False), (np.bool_(True), False, False), (3.0, False, True),
    (np.float32(0.5), False, True), (float("nan"), False, True), ("3", False, False),
    (None, False, False), (1 + 0j, False, False),
])
def test_is_whole_and_is_number(value: object, whole: bool, number: bool) -> None:
    assert is_whole(value) is whole
    assert is_number(value) is number


@pytest.mark.parametrize(("value", "expected"), [
    (100, True), (np.int64(7), True), (100.0, True), (np.float32(3.0), True), (-2.0, True),
    (2.5, False), (float("inf"), False), (float("nan"), False), (True, False),
    (np.bool_(False), False), ("100", False), (None, False),
])
def test_is_whole_valued(value: object, expected: bool) -> None:
    assert is_whole_valued(value) is expected


def test_a_bool_is_refused_where_an_int_test_let_it_through() -> None:
    # Each of these took True as 1 before the shared test.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(),
                                torch.nn.Linear(72, 2))
    images = np.zeros((2, 1, 8, 8), np.uint8)
    labels = np.zeros(2, np.int64)
    with pytest.raises(WhylookError, match="batch_size must be a positive integer, not True"):
        grad_cam(model, "0", images, labels, batch_size=True)
    with pytest.raises(WhylookError, match="n_components must be a positive integer, not True"):
        PrototypeFinder(4, n_components=True)
    with pytest.raises(WhylookError, match="refine_iter must be a positive integer, not True"):
        PrototypeFinder(4, refine_iter=True)


def test_numpy_integers_are_accepted_where_an_int_test_refused_them() -> None:
    finder = PrototypeFinder(np.int64(2), n_components=np.int64(2),
                             max_fit_vectors=np.int32(1000), init_vectors=np.int64(100),
                             refine_iter=np.int64(2))
    rng = np.random.default_rng(0)
    finder.partial_fit(rng.normal(size=(10, 4, 3, 3)).astype(np.float32),
                       sample_index=np.arange(10))
    assert finder.finalize().components.shape == (2, 4)
    assert StructureSettings(min_swings=np.int64(1)).min_swings == 1
    changes = rng.normal(size=(2, 30, 3)).astype(np.float32)
    find_patterns(changes, np.repeat(np.arange(3), 10), min_cluster_size=np.int64(5))
