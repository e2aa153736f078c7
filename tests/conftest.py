"""Shared fixtures. Tests that need the real datasets in ../shared/data skip cleanly
(with the reason printed by ``-ra``) where that folder is absent, as on a user's machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Decoded data sources go to a folder of this test session's own, never the user's cache
# (whylook/_datacache.py); CLI subprocesses inherit it. Tests of the cache set their own.
_DATA_CACHE = tempfile.mkdtemp(prefix="whylook-test-cache-")
os.environ["WHYLOOK_CACHE"] = _DATA_CACHE

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data {name} not found at {path} (only present beside a dev checkout)")
    return path


@pytest.fixture(scope="session")
def mnist_npz() -> Path:
    """The full real MNIST (60k/10k) as a Keras-style npz."""
    return _shared_file("mnist.npz")


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    """The real CIFAR-10 (50k/10k) as a zipped image-folder tree of JPEGs."""
    return _shared_file("cifar10-jpg.zip")


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_DATA_CACHE, ignore_errors=True)
