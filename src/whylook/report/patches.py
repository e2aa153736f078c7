"""Image patches: sample thumbnails with a prototype's grid cells outlined.

A prototype is a set of cells of the prototype layer's ``h×w`` map. Grid cell ``(r, c)``
covers pixels ``[r·H/h, (r+1)·H/h) × [c·W/w, (c+1)·W/w)`` of an ``H×W`` image, so a
thumbnail shows the prototype's patch by outlining the union of its cells and dimming the
rest. Everything here is numpy on ``uint8`` arrays; Pillow (a hard dependency of
matplotlib) only resizes and encodes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["GAP", "THUMB", "encode", "smaller_inline", "strip", "thumbnail"]

#: Target side of a thumbnail in pixels. Small images are enlarged by a whole factor
#: (nearest neighbour, so MNIST strokes stay crisp); large ones are shrunk to it. 64 px
#: keeps a 128-prototype CIFAR gallery (6 thumbnails each) within the page-size budget.
THUMB = 64

_OUTLINE = np.array([255, 208, 0], dtype=np.uint8)  # amber: visible on black MNIST and photos
GAP = 2  #: white pixels between the thumbnails of a strip


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 with C in {1, 3} -> (H, W, 3) uint8."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    hwc = np.moveaxis(arr, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    return np.ascontiguousarray(hwc[..., :3].astype(np.uint8, copy=False))


def _resize(rgb: np.ndarray) -> np.ndarray:
    H, W = rgb.shape[:2]
    side = max(H, W)
    if side <= THUMB:
        factor = max(1, round(THUMB / side))
        return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    scale = THUMB / side
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _pixel_mask(cells: np.ndarray, H: int, W: int) -> np.ndarray:
    """Spread an (h, w) cell mask over an (H, W) pixel grid: pixel y lies in row ⌊y·h/H⌋."""
    h, w = cells.shape
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    return cells[rows[:, None], cols[None, :]]


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of a pixel outside it (or of the edge)."""
    padded = np.pad(mask, width, constant_values=False)
    inner = mask.copy()
    H, W = mask.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if abs(dy) + abs(dx) > width:
                continue
            inner &= padded[width + dy : width + dy + H, width + dx : width + dx + W]
    return mask & ~inner


def thumbnail(image: np.ndarray, cells: np.ndarray | None = None) -> np.ndarray:
    """A ``(h', w', 3)`` uint8 thumbnail of ``image`` (C, H, W) with ``cells`` outlined.

    Example:
        >>> import numpy as np
        >>> img = np.zeros((1, 28, 28), np.uint8)
        >>> cells = np.zeros((7, 7), bool); cells[2, 3] = True
        >>> thumbnail(img, cells).shape
        (56, 56, 3)
    """
    rgb = _resize(_to_rgb(image))
    if cells is None or not np.any(cells):
        return rgb
    H, W = rgb.shape[:2]
    mask = _pixel_mask(np.asarray(cells, dtype=bool), H, W)
    out = rgb.astype(np.float32)
    # Dim what the prototype does not cover so that the patch reads at a glance.
    out[~mask] *= 0.45
    out = out.astype(np.uint8)
    out[_boundary(mask, max(1, H // 40))] = _OUTLINE
    return out


def strip(thumbs: Sequence[np.ndarray]) -> np.ndarray:
    """Thumbnails side by side (padded to a common height) with white gaps."""
    if not thumbs:
        raise ValueError("strip() needs at least one thumbnail")
    height = max(t.shape[0] for t in thumbs)
    parts: list[np.ndarray] = []
    for i, t in enumerate(thumbs):
        if i:
            parts.append(np.full((height, GAP, 3), 255, np.uint8))
        if t.shape[0] < height:
            pad = np.full((height - t.shape[0], t.shape[1], 3), 255, np.uint8)
            t = np.concatenate([t, pad], axis=0)
        parts.append(t)
    return np.concatenate(parts, axis=1)


def smaller_inline(png: bytes) -> tuple[bytes, str]:
    """``(data, mime)``: the PNG itself, or a JPEG of it when that is much smaller."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    return (jpeg, "image/jpeg") if len(jpeg) < 0.8 * len(png) else (png, "image/png")


def encode(rgb: np.ndarray) -> tuple[bytes, bytes, str]:
    """Encode an RGB image as ``(png, inline, mime)``.

    ``png`` is lossless and goes to disk for papers; ``inline`` is whichever of PNG and
    JPEG (quality 85) is smaller and goes into the page: flat MNIST strokes compress best
    as PNG, photographs as JPEG, and the page-size budget needs the smaller of the two.
    """
    img = Image.fromarray(np.ascontiguousarray(rgb))
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # level 6: optimize=True is 8x slower for ~1% smaller
    png = buf.getvalue()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    jpeg = buf.getvalue()
    if len(jpeg) < 0.8 * len(png):
        return png, jpeg, "image/jpeg"
    return png, png, "image/png"
