"""Shared fixtures. Tests that need the real datasets in ../shared/data skip cleanly
(with the reason printed by ``-ra``) where that folder is absent, as on a user's machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
