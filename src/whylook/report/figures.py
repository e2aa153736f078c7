"""The report's matplotlib figures, each returned as PNG bytes.

Every function builds one figure on an Agg canvas and renders it to PNG. The figures are
made without pyplot, so they are never registered as open figures (a report over
hundreds of figures accumulates none), and importing this module leaves the user's
matplotlib backend alone (no ``matplotlib.use``: a notebook keeps its inline plots).

Speed (a report draws two figures per class; text layout is most of matplotlib's time):
each figure is drawn once, on a canvas with room around it, and cropped to what was drawn
(``_png``; ``bbox_inches="tight"`` drew it twice); axes without a label and titles with
nothing above their axes skip matplotlib's measuring of every tick label to place them;
and within :func:`reusing` the per-class figures reuse one figure each. Measured with
``benchmarks/bench_report.py``.

Strings that come from data (class names) are drawn with math parsing off: a class named
``$x$`` is drawn as the three characters it is, not as TeX (and a stray ``$`` cannot make
matplotlib raise).
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar, cast

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PathCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter
from PIL import Image

from whylook._text import RATE_ROUNDING, floor_pct

__all__ = [
    "accuracy_loss",
    "active_rates",
    "bars_mean_std",
    "beta_heatmap",
    "confusion",
    "distinctness_scatter",
    "learning_timeline",
    "pattern_groups",
    "reusing",
    "saliency_strip",
    "uncertain_support",
]

DPI = 80  # laptop-screen size at 1:1; PNG files stay small enough to inline
_RC: dict[Any, Any] = {
    "text.parse_math": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    # The layout is the report's, whatever the user's style says: an automatic layout
    # would spread the axes over the margin _new_figure adds, and the titles' place
    # (_TITLE_Y) assumes tick labels below the axes.
    "figure.autolayout": False,
    "figure.constrained_layout.use": False,
    "xtick.labeltop": False,
    "xtick.labelbottom": True,
}


#: White space (inches) added around a figure that is not laid out by ``tight_layout``, so
#: that labels reaching past its nominal size are drawn on the canvas (and cropped to).
_MARGIN = 2.0
_PAD = round(0.1 * DPI)  # pixels of white around the drawn content, as savefig's pad_inches
_PNG_LEVEL = 3

#: A β heatmap's transition label gives the share of the class's samples whose Grad-CAM
#: map is blank at both ends from this share on.
BLANK_NOTE = 0.05


def _new_figure(width: float, height: float, margin: float = _MARGIN) -> Figure:
    """A ``width`` × ``height`` inch figure on an Agg canvas, with ``margin`` inches of room
    on every side: subplots keep the size and place they have in a figure of the nominal
    size, and tick labels, titles and colour bar labels outside it still land on the
    canvas, so :func:`_png` draws the figure once and crops (no ``bbox_inches="tight"``,
    which draws it twice). Figures laid out by ``tight_layout`` pass ``margin=0``: their
    content already fits. Call it under ``_settings()``."""
    w, h = width + 2 * margin, height + 2 * margin
    fig = Figure(figsize=(w, h), dpi=DPI)
    if margin:
        fig.subplots_adjust(left=(margin + 0.125 * width) / w, right=(margin + 0.9 * width) / w,
                            bottom=(margin + 0.11 * height) / h,
                            top=(margin + 0.88 * height) / h)
    FigureCanvasAgg(fig)  # render with Agg whatever the user's backend is
    return fig


#: matplotlib's settings are one global dictionary: figures drawn by two threads at once
#: would each see the other's settings come and go, so one figure is drawn at a time.
_DRAWING = threading.RLock()


@contextlib.contextmanager
def _settings() -> Iterator[None]:
    """The report's matplotlib settings (``_RC``), held by this thread while it draws."""
    with _DRAWING, matplotlib.rc_context(_RC):
        yield


@contextlib.contextmanager
def _figure(width: float, height: float, margin: float = _MARGIN) -> Iterator[Figure]:
    with _settings():
        yield _new_figure(width, height, margin)


#: While :func:`reusing` is active: figures kept for the next figure of their kind and size.
_KEPT: ContextVar[dict[tuple[Any, ...], Any] | None] = ContextVar("whylook_report_kept",
                                                                  default=None)
_T = TypeVar("_T")


@contextlib.contextmanager
def reusing() -> Iterator[None]:
    """Within this block, a β heatmap or saliency strip drawn at the size of one drawn
    before reuses that one's figure, axes, colour bar and tick labels with the new data and
    text, instead of building them anew (a report draws both for each class; building is
    a third of a heatmap's time). Each PNG is byte for byte the one a new figure gives.
    The kept figures are let go at the end of the block. Threads given the block's context
    (``asyncio.to_thread``) share them: figures are drawn one at a time (``_settings``)."""
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def _kept(key: tuple[Any, ...], build: Callable[[], _T]) -> _T:
    """``build()``, or, within :func:`reusing`, the one built for ``key`` before."""
    kept = _KEPT.get()
    if kept is None:
        return build()
    if key not in kept:
        kept[key] = build()
    return cast(_T, kept[key])


def _png(fig: Figure) -> bytes:
    """The figure as PNG (RGB), cropped to what is drawn plus :data:`_PAD` pixels of white.

    One draw: the crop is the box around every pixel that is not the background, joined
    with every axes' box (as ``bbox_inches="tight"`` joins them). Where something is drawn
    up to the canvas edge it may reach past it: then the figure is saved with
    ``bbox_inches="tight"``, which draws whatever the canvas holds.
    """
    buf = io.BytesIO()
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    height, width = rgba.shape[:2]
    pixels = rgba.view(np.uint32)[..., 0]  # one number per pixel: one comparison each
    ink = pixels != pixels[0, 0]
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if (not rows.size or rows[0] == 0 or cols[0] == 0 or rows[-1] == height - 1
            or cols[-1] == width - 1 or (rgba[0, 0] != 255).any()):
        # No timestamp in the metadata: the same run gives a byte-identical report.
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight",
                    metadata={"Software": None})
        return buf.getvalue()
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    for ax in fig.axes:
        bx0, by0, bx1, by1 = ax.bbox.extents  # display pixels, y up
        x0, x1 = min(x0, math.floor(bx0)), max(x1, math.ceil(bx1))
        y0, y1 = min(y0, math.floor(height - by1)), max(y1, math.ceil(height - by0))
    x0, y0 = max(0, x0 - _PAD), max(0, y0 - _PAD)
    x1, y1 = min(width, x1 + _PAD), min(height, y1 + _PAD)
    # RGB: the canvas is opaque, and an alpha channel of 255s only costs time and bytes.
    rgb = np.ascontiguousarray(rgba[y0:y1, x0:x1, :3])
    Image.fromarray(rgb).save(buf, format="png", dpi=(DPI, DPI), compress_level=_PNG_LEVEL)
    return buf.getvalue()


#: A colour per class in the pattern bars: tab10 with its grey (index 7) replaced by a
#: dark indigo, since a grey class group read as the noise bar beside it.
_CLASS_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#393b79", "#bcbd22", "#17becf"]

#: Up to this many checkpoints, the learning-order timeline names each on its axis.
_LABELLED_STEPS = 12


def _step_axis(ax: Axes, steps: Sequence[float], axis: str = "x") -> None:
    """Log-like axis when the steps span decades (log schedules), linear otherwise."""
    pos = [s for s in steps if s is not None and s > 0]
    if pos and max(pos) / min(pos) >= 50:
        setter = ax.set_xscale if axis == "x" else ax.set_yscale
        linthresh = max(1.0, float(min(pos)))
        setter("symlog", linthresh=linthresh)
        # Autoscale margins reach into negative steps on a symlog axis ("-1", "-10"):
        # steps are never negative, so start just left of 0.
        get, set_ = (ax.get_xlim, ax.set_xlim) if axis == "x" else (ax.get_ylim, ax.set_ylim)
        lo, hi = get()
        if lo < 0 and min(s for s in steps if s is not None) >= 0:
            set_(-0.15 * linthresh, hi)
        # Plain numbers ("100", not 10²): readable, and math text is off (see _RC).
        which = ax.xaxis if axis == "x" else ax.yaxis
        which.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)("optimizer step")


#: The title's place on axes whose x tick labels are at the bottom and whose y axis has no
#: offset text such as "1e-5" above it (it names categories, or its range holds 0): where
#: matplotlib puts it anyway. Given, it spares the draw a measuring of every y tick label
#: to look for something above the axes (9 ms of a β heatmap).
_TITLE_Y = 1.0


def _unlabelled(*axes: Axis) -> None:
    """Axes that have no label: hide the empty label and pin it in place. Otherwise every
    draw (and ``tight_layout``) measures all the axis's tick labels once more only to place
    the empty label beside them: 15% of drawing a β heatmap's 32 prototype rows."""
    for axis in axes:
        axis.label.set_visible(False)
        axis.set_label_coords(0, 0)


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def accuracy_loss(
    steps: Sequence[int],
    test_accuracy: Sequence[float | None],
    test_loss: Sequence[float | None],
    analysis_accuracy: Sequence[float],
) -> bytes:
    """Accuracy (test and analysis set) and test loss over the checkpoints."""
    has_loss = any(v is not None for v in test_loss)
    with _figure(9.5 if has_loss else 5.5, 3.0, margin=0) as fig:
        axes = fig.subplots(1, 2 if has_loss else 1, squeeze=False)[0]
        ax = axes[0]
        if any(v is not None for v in test_accuracy):
            xs = [s for s, v in zip(steps, test_accuracy, strict=True) if v is not None]
            ys = [100 * v for v in test_accuracy if v is not None]
            ax.plot(xs, ys, "o-", ms=3, label="test set")
        ax.plot(steps, [100 * v for v in analysis_accuracy], "s--", ms=3,
                label="analysis set")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("accuracy over checkpoints")
        ax.legend(loc="lower right", frameon=False)
        ax.grid(alpha=0.3)
        _step_axis(ax, steps)
        if has_loss:
            ax = axes[1]
            xs = [s for s, v in zip(steps, test_loss, strict=True) if v is not None]
            ys = [v for v in test_loss if v is not None]
            ax.plot(xs, ys, "o-", ms=3, color="C3")
            ax.set_ylabel("test loss")
            ax.set_title("test loss over checkpoints")
            ax.grid(alpha=0.3)
            _step_axis(ax, steps)
        fig.tight_layout()
        return _png(fig)


def confusion(matrix: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """Confusion matrix (rows = true class), counts annotated when it is small."""
    m = len(classes)
    side = min(9.0, 2.0 + 0.42 * m)
    with _figure(side + 0.8, side) as fig:
        ax = fig.subplots()
        im = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        labels = [_short(c, 10) for c in classes]
        if m <= 30:
            ax.set_xticks(range(m), labels, rotation=90 if m > 6 else 0)
            ax.set_yticks(range(m), labels)
        if m <= 15:
            vmax = matrix.max() if matrix.size else 0
            for i in range(m):
                for j in range(m):
                    v = int(matrix[i, j])
                    if v:
                        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                                color="white" if v > 0.6 * vmax else "black")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title, y=_TITLE_Y)
        ax.spines[:].set_visible(True)
        return _png(fig)


def active_rates(rates: np.ndarray, classes: Sequence[str]) -> bytes:
    """Heatmap of each prototype's active rate per class (classes × prototypes)."""
    k, m = rates.shape
    with _figure(min(16.0, 2.0 + 0.14 * k), 1.2 + 0.22 * min(m, 40)) as fig:
        ax = fig.subplots()
        im = ax.imshow(rates.T, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="active rate")
        step = 1 if k <= 40 else (4 if k <= 160 else 16)
        ax.set_xticks(range(0, k, step), [f"P-{i}" for i in range(0, k, step)], rotation=90)
        if m <= 40:
            ax.set_yticks(range(m), [_short(c) for c in classes])
        ax.set_ylabel("class")
        _unlabelled(ax.xaxis)
        ax.set_title("active rate of each prototype per class (analysis set)", y=_TITLE_Y)
        ax.spines[:].set_visible(True)
        return _png(fig)


def beta_heatmap(
    beta: np.ndarray,
    rows: Sequence[str],
    end_steps: Sequence[int],
    class_name: str,
    z: np.ndarray | None = None,
    blank: np.ndarray | None = None,
    per_sd: bool = False,
) -> bytes:
    """β for one class as prototypes × transitions, diverging colormap centred at 0.

    ``beta`` is (n_rows, T); transition t is labelled with the step of checkpoint t+1,
    where it ends. ``per_sd``: each cell was multiplied by the standard deviation of its
    prototype's intensity change at that transition (a standardised coefficient). Raw β
    is a confidence change per unit of intensity, and raw Grad-CAM grows by orders of
    magnitude during training, so raw β is largest at the first steps, where attention
    barely moves, and the colour scale hides the steps where the class is learned.
    Where z-scores are given, cells with |z| ≥ 2 get a dot, so the reader can
    tell signal from noise. ``blank`` (T,) is the fraction of the class's samples whose
    Grad-CAM map is all zero at both ends of each transition: β cannot see those samples
    there, and a transition where it is at least 5% says so in its label.
    """
    n, t = beta.shape
    v = float(np.nanmax(np.abs(beta))) if beta.size else 0.0
    v = v if v > 0 else 1e-12
    with _settings():
        fig, ax, im, dots = _kept(("beta", n, t, per_sd, z is not None),
                                  lambda: _beta_figure(n, t, per_sd, z is not None))
        im.set_data(beta)
        im.set_norm(Normalize(-v, v))  # the colour bar follows
        if dots is not None and z is not None:
            yy, xx = np.nonzero(np.abs(z) >= 2)
            dots.set_offsets(np.column_stack([xx, yy]))
        ax.set_yticks(range(n), rows)
        shown = blank if blank is not None else np.zeros(t)
        noted = shown >= BLANK_NOTE - RATE_ROUNDING
        ax.set_xticks(range(t), [f"→{s}" + (f" ({floor_pct(b)} blank)" if note else "")
                                 for s, b, note in zip(end_steps, shown, noted, strict=True)],
                      rotation=90)
        ax.set_xlabel("transition (ends at step)" + (
            "; blank: samples of the class whose Grad-CAM map is all zero at both ends"
            if noted.any() else ""))
        mark = "; • |z| ≥ 2" if z is not None else ""
        ax.set_title(f"β for class {_short(class_name, 24)} (red: more attention raised "
                     f"confidence{mark})", y=_TITLE_Y)
        return _png(fig)


def _beta_figure(
    n: int, t: int, per_sd: bool, dots: bool
) -> tuple[Figure, Axes, AxesImage, PathCollection | None]:
    """A β heatmap's figure without its data, labels and colour scale."""
    fig = _new_figure(min(12.0, 2.8 + 0.42 * t), 1.2 + 0.2 * n)
    ax = fig.subplots()
    im = ax.imshow(np.zeros((n, t)), cmap="RdBu_r", norm=Normalize(-1, 1), aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02,
                 label="β × s.d. of ΔP: confidence change\nper typical attention change"
                 if per_sd else "β (support for class)")
    scatter = (ax.scatter(np.zeros(0), np.zeros(0), s=4, c="black", marker="o", linewidths=0)
               if dots else None)
    _unlabelled(ax.yaxis)
    ax.spines[:].set_visible(True)
    return fig, ax, im, scatter


def _overlay(image: np.ndarray, sal: np.ndarray, vmax: float, side: int) -> np.ndarray:
    """(C,H,W) uint8 image + (h,w) saliency -> (H', W', 3) float blend, saliency bilinear."""
    rgb = np.moveaxis(np.asarray(image), 0, -1).astype(np.float32) / 255
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    H, W = rgb.shape[:2]
    f = max(1, round(side / max(H, W)))
    rgb = np.repeat(np.repeat(rgb, f, axis=0), f, axis=1)
    # PIL's bilinear resize puts the h×w cell centres at the centres of the pixel blocks
    # they cover, so the upsampled map lines up with the grid cells.
    up = Image.fromarray(np.asarray(sal, dtype=np.float32), mode="F").resize(
        (rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR)
    heat = matplotlib.colormaps["inferno"](np.clip(np.asarray(up) / vmax, 0, 1))[..., :3]
    return 0.45 * rgb + 0.55 * heat


def saliency_strip(
    image: np.ndarray,
    saliency: np.ndarray,
    steps: Sequence[int],
    confidence: Sequence[float],
    class_name: str,
) -> bytes:
    """One sample's Grad-CAM at several checkpoints, upsampled over the image.

    Top row: raw saliency on one colour scale for all panels. Saliency is kept raw
    (docs/METHOD-NOTES.md, Step 2), so this row compares how strong the attention is across
    checkpoints.
    Early checkpoints are often near zero on that scale, so the bottom row scales each
    panel to its own maximum and shows where the attention is, i.e. how it moves. The
    panels are blended in numpy and drawn as one image (one axes instead of one per
    panel: several times faster to render).
    """
    n = len(steps)
    vmax = float(saliency.max()) if saliency.size and saliency.max() > 0 else 1.0
    raw = [_overlay(image, s, vmax, 96) for s in saliency]
    own = [_overlay(image, s, float(s.max()) if s.max() > 0 else 1.0, 96) for s in saliency]
    ph, pw = raw[0].shape[:2]
    gap = max(2, pw // 12)
    grid = np.ones((2 * ph + gap, n * pw + (n - 1) * gap, 3), np.float32)
    for i in range(n):
        x = i * (pw + gap)
        grid[:ph, x : x + pw] = raw[i]
        grid[ph + gap :, x : x + pw] = own[i]
    with _settings():
        fig, im, labels, scale = _kept(("saliency", n, ph, pw, gap),
                                       lambda: _strip_figure(n, ph, pw, gap))
        # As bytes, as matplotlib would turn the floats (x 255, truncated) after its
        # nearest-neighbour resampling: the same pixels, without a float RGBA copy.
        rgba = np.full((*grid.shape[:2], 4), 255, np.uint8)
        rgba[..., :3] = grid * 255
        im.set_data(rgba)
        for label, step, conf in zip(labels, steps, confidence, strict=True):
            label.set_text(f"step {step}\np({_short(class_name, 10)}) = {conf:.2f}")
        scale.set_norm(Normalize(0, vmax))  # the colour bar follows
        return _png(fig)


def _strip_figure(
    n: int, ph: int, pw: int, gap: int
) -> tuple[Figure, AxesImage, list[Text], ScalarMappable]:
    """A saliency strip's figure without its panels, panel titles and colour scale."""
    fig = _new_figure(1.45 * n + 1.6, 3.7)
    ax = fig.subplots()
    im = ax.imshow(np.ones((2 * ph + gap, n * pw + (n - 1) * gap, 3), np.float32),
                   interpolation="nearest")
    labels = [ax.text(i * (pw + gap) + pw / 2, -3, "", ha="center", va="bottom", fontsize=8)
              for i in range(n)]
    ax.text(-4, ph / 2, "raw,\none scale", ha="right", va="center", fontsize=8)
    ax.text(-4, ph + gap + ph / 2, "each panel\nto its max", ha="right", va="center",
            fontsize=8)
    ax.set_axis_off()
    sm = ScalarMappable(norm=Normalize(0, 1), cmap="inferno")
    fig.colorbar(sm, ax=ax, fraction=0.02, pad=0.01, label="Grad-CAM (top row, raw)")
    return fig, im, labels, sm


def uncertain_support(
    end_steps: Sequence[int],
    lead_z: np.ndarray,
    threshold: float,
    names: tuple[str, str],
    swing_steps: Sequence[int],
    proto: str,
) -> bytes:
    """The rule behind an uncertain prototype, drawn: its accumulated lead of class a
    over b (``structure.accumulated_lead``) after each transition, the band within which
    neither side is favoured, and the swings (changes of the favoured side)."""
    with _figure(6.5, 2.8, margin=0) as fig:
        ax = fig.subplots()
        ax.axhspan(-threshold, threshold, color="0.9", lw=0, label="neither favoured")
        ax.axhline(0, color="0.6", lw=0.8)
        for i, s in enumerate(swing_steps):
            ax.axvline(s, color="C3", ls=":", lw=1.2, label="swing" if i == 0 else None)
        ax.plot(end_steps, lead_z, "o-", ms=3, color="C0")
        a, b = _short(names[0]), _short(names[1])
        ax.set_ylabel(f"lead of {a} over {b} (z)")
        # The band around 0 keeps 0 on the y axis, so no offset above it; leads of 1e6 and
        # more get a scale factor there, at the axis's left end, clear of the centred title.
        ax.set_title(f"{proto}: support accumulated so far, {a} (up) vs {b} (down)",
                     y=_TITLE_Y)
        ax.legend(loc="best", frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
        _step_axis(ax, list(end_steps))
        fig.tight_layout()
        return _png(fig)


def learning_timeline(
    pairs: Sequence[str],
    separated: Sequence[int | None],
    checkpoint_steps: Sequence[int],
    note: str = "",
) -> bytes:
    """When each class pair was separated: one row per pair, earliest first."""
    n = len(pairs)
    last = max(checkpoint_steps) if checkpoint_steps else 1
    never_x = last * 1.6 if last > 0 else 1
    with _figure(7.5, 1.0 + 0.19 * max(n, 1), margin=0) as fig:
        ax = fig.subplots()
        for s in checkpoint_steps:
            ax.axvline(s, color="0.88", lw=0.8, zorder=0)
        xs = [never_x if s is None else s for s in separated]
        colors = ["0.55" if s is None else "C0" for s in separated]
        ax.hlines(range(n), [checkpoint_steps[0] if checkpoint_steps else 0] * n, xs,
                  colors=colors, lw=1.5)
        ax.scatter(xs, range(n), c=colors, s=14, zorder=3)
        ax.set_yticks(range(n), pairs, fontsize=7)
        _unlabelled(ax.yaxis)
        ax.invert_yaxis()
        ax.set_ylim(n - 0.5, -0.5)
        _step_axis(ax, [*checkpoint_steps, never_x])
        if 0 < len(checkpoint_steps) <= _LABELLED_STEPS:
            # Each checkpoint labelled: the separations sit on them, and a log axis would
            # label only its decades (a pair separated at step 32 on an unnamed line).
            ax.set_xticks(list(checkpoint_steps))
        if any(s is None for s in separated):
            ax.text(never_x, -0.9, "never", ha="center", va="bottom", fontsize=7, color="0.4")
        ax.set_title("separation step of each class pair" + (f" ({note})" if note else ""),
                     y=_TITLE_Y)
        fig.tight_layout()
        return _png(fig)


def pattern_groups(
    end_steps: Sequence[int],
    groups: Sequence[Sequence[tuple[int, int | None]]],
    n: int,
    classes: Sequence[str],
) -> bytes:
    """The learning-pattern groups of each transition as one stacked bar: noise in grey at
    the bottom, then each group, largest first, coloured by the class it gained confidence
    in most, hatched grey when it is steady (``groups[t]``: ``(size, class index or None
    for a steady group)`` per group)."""
    from matplotlib.patches import Patch

    with _figure(7.5, 3.2, margin=0) as fig:
        ax = fig.subplots()
        x = np.arange(len(groups))
        noise = [n - sum(size for size, _ in bars) for bars in groups]
        ax.bar(x, noise, color="0.85", width=0.8)
        bottom = np.array(noise, dtype=float)
        seen: dict[int, None] = {}
        steady: dict[str, Any] = {"facecolor": "0.97", "edgecolor": "0.6", "hatch": "///"}
        for t, bars in enumerate(groups):
            for size, c in bars:
                style = (steady if c is None
                         else {"color": _CLASS_COLOURS[c % 10], "edgecolor": "white"})
                ax.bar(t, size, bottom=bottom[t], width=0.8, linewidth=0.5, **style)
                if c is not None:
                    if size >= 0.07 * n:  # a label only where it fits inside its segment
                        ax.text(t, bottom[t] + size / 2, _short(classes[c], 8), ha="center",
                                va="center", fontsize=7, color="white")
                    seen[c] = None
                bottom[t] += size
        handles = [Patch(color="0.85", label="noise")] + [
            Patch(color=_CLASS_COLOURS[c % 10], label=_short(classes[c]))
            for c in sorted(seen)[:12]]
        if any(c is None for bars in groups for _, c in bars):
            handles.insert(1, Patch(label="steady", **steady))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
                  frameon=False, title="gained most", title_fontsize=7)
        ax.set_xticks(x, [f"→{s}" for s in end_steps], fontsize=7)
        ax.set_xlabel("transition (ends at step)")
        ax.set_ylabel("samples")
        ax.set_ylim(0, n)
        ax.set_title("groups of samples whose confidences moved alike", y=_TITLE_Y)
        fig.tight_layout()
        return _png(fig)


def distinctness_scatter(
    distinctness: Sequence[float],
    separated: Sequence[int],
    labels: Sequence[str],
    title: str,
    never: Sequence[float] = (),
) -> bytes:
    """Prototype distinctness vs separation step, one point per separated pair.

    ``never`` holds the distinctness of the pairs never separated: the Spearman correlation
    in the title ranks them after every separated pair, so they get a strip of their own
    above the steps, where the eye reads them as the latest.
    """
    with _figure(5.5, 4.2 if never else 3.8, margin=0) as fig:
        if never:
            top, ax = fig.subplots(2, 1, sharex=True,
                                   height_ratios=[1, 6])
            top.scatter(never, [0] * len(never), s=16, facecolors="none", edgecolors="0.4")
            top.set_yticks([0], ["never"])
            top.tick_params(axis="x", bottom=False)
            _unlabelled(top.xaxis, top.yaxis)
            top.grid(alpha=0.3)
            top.set_title(title)
        else:
            ax = fig.subplots()
            ax.set_title(title)
        ax.scatter(distinctness, separated, s=16, alpha=0.8)
        if len(labels) <= 20:
            for x, y, lab in zip(distinctness, separated, labels, strict=True):
                ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("prototype distinctness of the pair")
        _step_axis(ax, list(separated), axis="y")
        ax.set_ylabel("separated at step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return _png(fig)


def bars_mean_std(
    labels: Sequence[str], means: Sequence[float], stds: Sequence[float | None], what: str
) -> bytes:
    """Bar chart of a mean ± std column of a result table."""
    n = len(labels)
    with _figure(min(10.0, 1.5 + 0.8 * n), 2.8, margin=0) as fig:
        ax = fig.subplots()
        err = [0.0 if s is None else s for s in stds]
        ax.bar(range(n), means, yerr=err, capsize=3, color="C0", alpha=0.85)
        ax.set_xticks(range(n), [_short(lab, 18) for lab in labels],
                      rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
        lo = min(m - e for m, e in zip(means, err, strict=True))
        hi = max(m + e for m, e in zip(means, err, strict=True))
        if lo > 0 and (hi - lo) < 0.2 * hi:
            # Accuracies sit within a few points of each other: zoom in on the differences.
            pad = max(hi - lo, 1e-9) * 0.6
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(what)
        _unlabelled(ax.xaxis)
        ax.set_title(f"{what} (mean ± std)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        return _png(fig)
