"""The report's figures as drawn: cropped once like a tight bounding box, nothing cut off,
and a figure reused for the next class equal to one drawn anew, with every label its own."""

from __future__ import annotations

import importlib
import importlib.util
import io
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from _synthetic_run import make_synthetic_run
from whylook.report import report

figures = importlib.import_module("whylook.report.figures")  # the module, not a function
Call = tuple[str, tuple[Any, ...], dict[str, Any], bytes]


def _figure_functions() -> list[str]:
    return [name for name in figures.__all__
            if getattr(figures, name).__annotations__.get("return") == "bytes"]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> list[Call]:
    """Every figure call of one report of a four-class run, with the PNG it returned."""
    root = tmp_path_factory.mktemp("figures")
    run = make_synthetic_run(root, finetune=True, compare=True)
    calls: list[Call] = []

    def recorder(name: str, draw: Callable[..., bytes]) -> Callable[..., bytes]:
        def record(*args: Any, **kwargs: Any) -> bytes:
            png = draw(*args, **kwargs)
            calls.append((name, args, kwargs, png))
            return png
        return record

    with pytest.MonkeyPatch.context() as mp:
        for name in _figure_functions():
            mp.setattr(figures, name, recorder(name, getattr(figures, name)))
        report(run, out=root / "report")
    return calls


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def _tight_png(fig: Figure) -> bytes:
    """The figure as ``savefig(bbox_inches="tight")`` writes it (two draws)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=figures.DPI, bbox_inches="tight")
    return buf.getvalue()


def test_every_figure_is_cropped_as_a_tight_bounding_box_and_nothing_is_cut_off(
    drawn: list[Call], monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = {name for name, *_ in drawn}
    assert {"beta_heatmap", "saliency_strip", "confusion", "active_rates", "accuracy_loss",
            "learning_timeline", "pattern_groups", "uncertain_support"} <= kinds
    monkeypatch.setattr(figures, "_png", _tight_png)
    for name, args, kwargs, png in drawn:
        pixels = _pixels(png)
        tight = _pixels(getattr(figures, name)(*args, **kwargs))
        # The same picture as savefig's tight box: within 3 px in each direction (the
        # box is whole pixels here, fractional there), not the canvas with its margins.
        assert abs(pixels.shape[0] - tight.shape[0]) <= 3, name
        assert abs(pixels.shape[1] - tight.shape[1]) <= 3, name
        # Nothing reaches the edge: no label was cut at the canvas border.
        border = np.concatenate([pixels[:4].reshape(-1, 3), pixels[-4:].reshape(-1, 3),
                                 pixels[:, :4].reshape(-1, 3), pixels[:, -4:].reshape(-1, 3)])
        assert (border == 255).all(), name
        assert (pixels != 255).any(axis=2).mean() > 0.02, name  # not blank


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Figure, dict[str, Any]]]:
    """Each figure handed to ``_png``, in order, with its texts as they were drawn."""
    figs: list[tuple[Figure, dict[str, Any]]] = []
    png = figures._png

    def capture(fig: Figure) -> bytes:
        out = png(fig)
        figs.append((fig, _labels(fig)))
        return out

    monkeypatch.setattr(figures, "_png", capture)
    return figs


def _labels(fig: Figure) -> dict[str, Any]:
    ax, *others = fig.axes
    return {"y": [t.get_text() for t in ax.get_yticklabels()],
            "x": [t.get_text() for t in ax.get_xticklabels()],
            "xlabel": ax.get_xlabel(), "title": ax.get_title(),
            "texts": [t.get_text() for t in ax.texts],
            "colour bar": [(o.get_ylabel(), len(o.get_yticks())) for o in others]}


@pytest.mark.parametrize("kind", ["beta_heatmap", "saliency_strip"])
def test_a_reused_figure_is_the_one_drawn_anew_with_its_own_labels(
    drawn: list[Call], captured: list[tuple[Figure, dict[str, Any]]], kind: str
) -> None:
    calls = [(args, kwargs, png) for name, args, kwargs, png in drawn if name == kind]
    assert len(calls) >= 3
    with figures.reusing():
        reused = [getattr(figures, kind)(*args, **kwargs) for args, kwargs, _ in calls]
    assert len({id(fig) for fig, _ in captured}) == 1  # one figure drawn for every class
    reused_labels = [labels for _, labels in captured]
    captured.clear()
    fresh = [getattr(figures, kind)(*args, **kwargs) for args, kwargs, _ in calls]
    assert len({id(fig) for fig, _ in captured}) == len(calls)
    # Byte for byte the PNG of a new figure, and the report's own (it reuses them too).
    assert reused == fresh == [png for _, _, png in calls]
    assert reused_labels == [labels for _, labels in captured]
    for (args, _, _), labels in zip(calls, reused_labels, strict=True):
        assert labels["colour bar"][0][1] >= 3  # a colour bar with its ticks and label
        assert labels["colour bar"][0][0]
        if kind == "beta_heatmap":
            rows, end_steps, class_name = args[1:4]
            assert labels["y"] == list(rows)  # every prototype row
            assert [x.split(" ")[0] for x in labels["x"]] == [f"→{s}" for s in end_steps]
            assert f"β for class {class_name} " in labels["title"]
            assert labels["xlabel"].startswith("transition (ends at step)")
        else:
            steps, confidence, class_name = args[2:]
            assert labels["texts"][: len(steps)] == [
                f"step {s}\np({class_name}) = {c:.2f}" for s, c in zip(steps, confidence,
                                                                     strict=True)]
            assert labels["texts"][len(steps):] == ["raw,\none scale", "each panel\nto its max"]


def test_a_label_past_the_margin_is_drawn_whole() -> None:
    """A row label far wider than the room around the figure: the figure is saved with a
    tight bounding box instead of cropped from the canvas, and the label is not cut."""
    rows = ["P-0 " + "long " * 80, "P-1"]
    png = figures.beta_heatmap(np.array([[0.5, -0.5], [0.1, 0.0]]), rows, [1, 2], "a")
    pixels = _pixels(png)
    width = min(12.0, 2.8 + 0.42 * 2) + 2 * figures._MARGIN
    assert pixels.shape[1] > width * figures.DPI  # wider than the canvas: drawn whole
    assert (pixels[:, :4] == 255).all()  # with white space left of the label


def test_the_benchmark_times_every_figure_function_and_puts_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("bench_report", benchmarks / "bench_report.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = {name: getattr(figures, name) for name in figures.__all__}
    log: dict[str, list[float]] = defaultdict(list)
    restore = bench.timed_figures(log)
    try:
        wrapped = {name for name in figures.__all__ if getattr(figures, name) is not before[name]}
        assert wrapped == set(_figure_functions()) == set(figures.__all__) - {"reusing"}
        figures.bars_mean_std(["a", "b"], [1.0, 2.0], [0.1, None], "accuracy")
        assert list(log) == ["bars_mean_std"]
    finally:
        restore()
    assert all(getattr(figures, name) is before[name] for name in figures.__all__)


@pytest.mark.parametrize("style", [{"figure.autolayout": True},
                                   {"figure.constrained_layout.use": True},
                                   {"xtick.labeltop": True, "xtick.labelbottom": False}])
def test_a_users_matplotlib_style_does_not_change_the_layout(
    drawn: list[Call], style: dict[str, Any]
) -> None:
    """A style that lays figures out automatically would spread the axes over the margin
    the figures are drawn with (twice the size, and a warning); one with tick labels on
    top would put them under the titles: every figure comes out as under the defaults."""
    import warnings

    import matplotlib

    for name, args, kwargs, png in drawn:
        with matplotlib.rc_context(style), warnings.catch_warnings():
            warnings.simplefilter("error")
            again = getattr(figures, name)(*args, **kwargs)
        assert _pixels(again).shape == _pixels(png).shape, name
        assert np.array_equal(_pixels(again), _pixels(png)), name


def test_threads_drawing_inside_one_reusing_block_each_get_their_own_figure(
    drawn: list[Call],
) -> None:
    """Work handed to threads with the block's context (``asyncio.to_thread`` does so)
    shares its kept figures: without a figure of their own they drew on one at once
    (matplotlib raised); each PNG is the one drawn alone."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    calls = [(args, kwargs, png) for name, args, kwargs, png in drawn
             if name == "beta_heatmap"] * 4
    with figures.reusing(), ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(contextvars.copy_context().run, figures.beta_heatmap, *args,
                               **kwargs) for args, kwargs, _ in calls]
        pngs = [f.result() for f in futures]
    assert pngs == [png for _, _, png in calls]
