"""A planted-structure dataset: classes defined by known motifs at random places.

It is the ground truth the explanation is checked against. Each class is a set of
motifs (small binary stamps) placed at random, non-overlapping positions on a noisy
background; some motifs are shared between two classes, and one class comes in two
variants that differ in one motif. Because the generator records where every motif went,
a test can check that a class's shared prototypes land on that class's motifs and that
the two-variant class gets specialized prototypes for its variants.

Example:
    >>> ds = planted_dataset(n_train=100, n_test=20, seed=0)
    >>> ds.train.images.shape, ds.classes
    ((100, 1, 28, 28), ('A+B', 'B+C', 'D+E', 'H+F|G+I'))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MOTIFS", "PLANTED_CLASSES", "PlantedDataset", "planted_dataset"]

_SIZE = 28
_MOTIF = 7

# 7x7 stamps, chosen to be unlike each other under small shifts.
MOTIFS: dict[str, np.ndarray] = {}


def _stamp(rows: list[str]) -> np.ndarray:
    return np.array([[ch == "#" for ch in r] for r in rows], dtype=np.float32)


MOTIFS["A"] = _stamp(["#.....#", ".#...#.", "..#.#..", "...#...", "..#.#..", ".#...#.", "#.....#"])
MOTIFS["B"] = _stamp(["#######", "#.....#", "#.....#", "#.....#", "#.....#", "#.....#", "#######"])
MOTIFS["C"] = _stamp(["...#...", "...#...", "...#...", "#######", "...#...", "...#...", "...#..."])
MOTIFS["D"] = _stamp(["#######", ".......", "#######", ".......", "#######", ".......", "#######"])
MOTIFS["E"] = _stamp(["#.#.#.#", "#.#.#.#", "#.#.#.#", "#.#.#.#", "#.#.#.#", "#.#.#.#", "#.#.#.#"])
MOTIFS["F"] = _stamp(["..###..", ".#####.", "#######", "#######", "#######", ".#####.", "..###.."])
MOTIFS["H"] = _stamp(["...#...", "..#.#..", ".#...#.", "#.....#", ".#...#.", "..#.#..", "...#..."])
MOTIFS["I"] = _stamp(["#######", "#######", "...#...", "...#...", "...#...", "...#...", "...#..."])
MOTIFS["G"] = _stamp(["......#", ".....#.", "....#..", "...#...", "..#....", ".#.....", "#......"])

# Class -> list of alternatives, each a tuple of motifs. B is shared by classes 0 and 1;
# class 3 has two variants that share no motif (H with F, or G with I), so the model must
# learn both. Every class has two motifs, so the empty background carries no class
# information.
PLANTED_CLASSES: dict[str, list[tuple[str, ...]]] = {
    "A+B": [("A", "B")],
    "B+C": [("B", "C")],
    "D+E": [("D", "E")],
    "H+F|G+I": [("H", "F"), ("G", "I")],
}
_VARIANT_WEIGHTS = {"H+F|G+I": (0.55, 0.45)}


@dataclass(frozen=True)
class PlantedDataset:
    """Images, labels and the ground truth of where each motif was planted."""

    classes: tuple[str, ...]
    train: _Part
    test: _Part

    def save_npz(self, path: str | Path) -> Path:
        """Write Keras-style ``x_train, y_train, x_test, y_test`` for ``npz:PATH``."""
        from whylook._io import save_npz

        # Atomic like every file whylook writes (a data file cut short would be read as data).
        return save_npz(path, {"x_train": self.train.images[:, 0], "y_train": self.train.labels,
                               "x_test": self.test.images[:, 0], "y_test": self.test.labels})


@dataclass(frozen=True)
class _Part:
    images: np.ndarray  # (N, 1, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    variants: np.ndarray  # (N,) int64: which alternative of its class
    motif_masks: dict[str, np.ndarray]  # motif -> (N, 28, 28) bool, where it was planted


def _make(n: int, rng: np.random.Generator) -> _Part:
    names = list(PLANTED_CLASSES)
    labels = np.arange(n) % len(names)
    rng.shuffle(labels)
    canvas = rng.normal(20.0, 12.0, size=(n, _SIZE, _SIZE))
    variants = np.zeros(n, dtype=np.int64)
    masks = {m: np.zeros((n, _SIZE, _SIZE), dtype=bool) for m in MOTIFS}
    # Positions on a coarse lattice keep motifs from overlapping while still moving them.
    slots = [(r, c) for r in (1, 10, 19) for c in (1, 10, 19)]
    for i, y in enumerate(labels):
        name = names[y]
        alts = PLANTED_CLASSES[name]
        v = int(rng.choice(len(alts), p=_VARIANT_WEIGHTS.get(name)))
        variants[i] = v
        chosen = rng.choice(len(slots), size=len(alts[v]), replace=False)
        for motif, s in zip(alts[v], chosen, strict=True):
            r, c = slots[s]
            r += int(rng.integers(0, 2))
            c += int(rng.integers(0, 2))
            stamp = MOTIFS[motif]
            canvas[i, r:r + _MOTIF, c:c + _MOTIF] += stamp * rng.uniform(170, 230)
            masks[motif][i, r:r + _MOTIF, c:c + _MOTIF] = stamp > 0
    images = np.clip(canvas, 0, 255).astype(np.uint8)[:, None]
    return _Part(images=images, labels=labels.astype(np.int64), variants=variants,
                 motif_masks=masks)


def planted_dataset(n_train: int = 2000, n_test: int = 400, seed: int = 0) -> PlantedDataset:
    """Generate the planted-structure dataset (28×28 grayscale, 4 classes)."""
    rng = np.random.default_rng(seed)
    return PlantedDataset(classes=tuple(PLANTED_CLASSES), train=_make(n_train, rng),
                          test=_make(n_test, rng))
