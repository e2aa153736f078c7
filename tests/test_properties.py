"""Property-based tests: random malformed arrays and options thrown at the data and
analysis entry points give either a valid result or a one-line WhylookError; never
another exception (a traceback for a CLI user) and never a hang.

Every example runs under a time guard (SIGALRM), so a hang fails the test instead of
stalling the suite. Example counts are small: the suite runs on every commit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from torch import nn

from _tiny_run import baseline, copy_run
from whylook.data import Split, load_data
from whylook.errors import WhylookError
from whylook.explain import ExplainSettings, explain
from whylook.saliency import grad_cam

#: WHYLOOK_PROPERTY_EXAMPLES=500 searches longer (locally); CI keeps the suite fast.
DEEP = int(os.environ.get("WHYLOOK_PROPERTY_EXAMPLES", "0"))
FAST = settings(
    max_examples=DEEP or 40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Hang(Exception):  # noqa: N818 - named for what the failure means
    pass


@contextlib.contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Fail an example that runs longer than ``seconds`` (a hang, for these inputs)."""

    def alarm(*_: object) -> None:
        raise Hang(f"an example ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expect_result_or_whylook_error(call, seconds: float = 20):  # type: ignore[no-untyped-def]
    """The call's result, or None when it raised a one-line WhylookError."""
    message = None
    with time_guard(seconds):
        try:
            result = call()
        except WhylookError as exc:
            message = str(exc)
        else:
            event("accepted")
            return result
    event("refused")
    assert message.strip()
    assert "\n" not in message
    return None


# ----------------------------------------------------------------------------- data

DTYPES = st.sampled_from(
    ["uint8", "int8", "int16", "int64", "uint16", "float16", "float32", "float64", "bool",
     "complex64", "<U2", "S1", "datetime64[s]"]
)


def any_array(max_dims: int = 5, max_side: int = 5) -> st.SearchStrategy[np.ndarray]:
    return DTYPES.flatmap(
        lambda dtype: hnp.arrays(
            dtype, hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0,
                                    max_side=max_side)
        )
    )


NON_FINITE = st.sampled_from([np.nan, np.inf, -np.inf])


def plausible_images() -> st.SearchStrategy[np.ndarray]:
    """Nearly right images: a real layout, odd sizes, values and dtypes."""
    shape = st.one_of(
        st.tuples(st.integers(0, 7), st.integers(1, 10), st.integers(1, 10)),
        st.tuples(st.integers(0, 7), st.integers(1, 10), st.integers(1, 10),
                  st.sampled_from([1, 2, 3, 4])),
        st.tuples(st.integers(0, 7), st.sampled_from([1, 3]), st.integers(1, 10),
                  st.integers(1, 10)),
    )
    dtype = st.sampled_from(["uint8", "int16", "float32", "float64"])
    elements = {
        "uint8": st.integers(0, 255),
        "int16": st.integers(-3, 300),
        "float32": st.one_of(st.floats(-2, 300, width=32), NON_FINITE),
        "float64": st.one_of(st.floats(-2, 300), NON_FINITE),
    }
    return st.tuples(dtype, shape).flatmap(
        lambda ds: hnp.arrays(ds[0], ds[1], elements=elements[ds[0]])
    )


def plausible_labels() -> st.SearchStrategy[np.ndarray]:
    return st.one_of(
        hnp.arrays("int64", st.integers(0, 7), elements=st.integers(-2, 4)),
        hnp.arrays("float64", st.integers(0, 7),
                   elements=st.sampled_from([0.0, 1.0, 2.0, 0.5, np.nan, -1.0])),
        hnp.arrays("int64", st.tuples(st.integers(0, 7), st.integers(1, 3)),
                   elements=st.integers(0, 2)),
    )


def _astype(value: np.ndarray, dtype: str) -> np.ndarray:
    try:
        return value.astype(dtype)
    except (ValueError, TypeError, OverflowError):  # e.g. class names to integers
        return value


MUTATIONS = ("drop", "random", "dtype", "poke", "truncate", "scale", "axis", "plausible")


@st.composite
def npz_contents(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """A valid Keras-style npz, then 0-3 random mutations: random inputs alone are
    refused by the first check; mutations of a valid file reach the later ones."""
    m = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    channels_last = draw(st.sampled_from([None, 1, 3]))
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        y = draw(hnp.arrays("int64", st.integers(1, 7), elements=st.integers(0, m - 1)))
        if split == "train":
            # Every class has training images: unmutated, a valid file (with m > 1), so
            # that the checks of an accepted source run often, not once in forty examples.
            y = np.concatenate([np.arange(m), y])
        n = len(y)
        shape = (n, h, w) if channels_last is None else (n, h, w, channels_last)
        arrays[f"x_{split}"] = draw(hnp.arrays("uint8", shape))
        arrays[f"y_{split}"] = y
    if draw(st.booleans()):
        arrays["classes"] = np.array([f"c{i}" for i in range(m)])
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "classes"]))
        kind = draw(st.sampled_from(MUTATIONS))
        value = arrays.get(key)
        if kind == "drop" or value is None:
            arrays.pop(key, None)
            if kind != "drop":
                arrays[key] = draw(any_array())
            continue
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            if kind == "random":
                value = draw(any_array())
            elif kind == "plausible":
                value = draw(plausible_images() if key.startswith("x") else plausible_labels())
            elif kind == "dtype":
                value = _astype(value, draw(DTYPES))
            elif kind == "poke" and value.size:
                value = value.astype(np.float64) if value.dtype.kind in "iub" else value.copy()
                if value.dtype.kind == "f":
                    value.flat[draw(st.integers(0, value.size - 1))] = draw(
                        st.sampled_from([np.nan, np.inf, -1.0, 256.0, 0.5, 1e9, 2.0]))
            elif kind == "truncate" and value.ndim:
                value = value[: draw(st.integers(0, max(len(value) - 1, 0)))]
            elif kind == "scale" and value.dtype.kind in "iuf":
                value = value / draw(st.sampled_from([255.0, 1.0, -1.0, 0.5]))
            elif kind == "axis" and value.ndim:
                flat = draw(st.booleans()) and value.ndim > 0 and value.size > 0
                value = value.reshape(len(value), -1) if flat else value[:, None]
        arrays[key] = value
    return arrays


def check_source(ds) -> None:  # type: ignore[no-untyped-def]
    """What every loaded data source guarantees."""
    m = ds.num_classes
    assert m >= 2
    assert len(set(ds.classes)) == m
    for split in (ds.train, ds.test):
        assert split.images.dtype == np.uint8
        assert split.images.ndim == 4
        assert split.images.shape[1] in (1, 3)
        assert split.labels.dtype == np.int64
        assert len(split.labels) == len(split.images) > 0
        assert ((split.labels >= 0) & (split.labels < m)).all()
    assert ds.train.images.shape[1:] == ds.test.images.shape[1:]
    assert (np.bincount(ds.train.labels, minlength=m) > 0).all()


_GREY = {"x_train": np.arange(120, dtype=np.uint8).reshape(4, 5, 6), "y_train": np.arange(4) % 2,
         "x_test": np.zeros((2, 5, 6), np.uint8), "y_test": np.arange(2)}


@FAST
@given(arrays=npz_contents(), limit=st.one_of(st.none(), st.integers(-1, 3)))
@example(arrays=_GREY, limit=None)  # always one valid file, whatever the random draws
def test_random_npz_files_load_or_give_a_whylook_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], limit: int | None
) -> None:
    path = tmp_path / "random.npz"
    np.savez(path, **arrays)
    ds = expect_result_or_whylook_error(lambda: load_data(f"npz:{path}", limit_per_class=limit))
    if ds is not None:
        check_source(ds)


@st.composite
def images_and_labels(draw: st.DrawFn, channels: int | None = None) -> tuple:
    """Valid uint8 (N, C, H, W) images and (N,) labels in 0..2, then 0-2 mutations."""
    n = draw(st.integers(1, 5))
    c = channels or draw(st.sampled_from([1, 3]))
    shape = (n, c, draw(st.integers(1, 7)), draw(st.integers(2, 7)))
    images = draw(hnp.arrays("uint8", shape))
    labels = draw(hnp.arrays("int64", n, elements=st.sampled_from([0, 1, 2, 0, 1, 2, 3])))
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(["images", "labels"]))
        value = images if target == "images" else labels
        kind = draw(st.sampled_from(MUTATIONS))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            if kind in ("random", "drop"):
                value = draw(any_array(max_side=6))
            elif kind == "plausible":
                value = draw(plausible_images() if target == "images" else plausible_labels())
            elif kind == "dtype":
                value = _astype(value, draw(DTYPES))
            elif kind == "poke" and value.size and value.dtype.kind in "iubf":
                value = value.astype(np.float64)
                value.flat[draw(st.integers(0, value.size - 1))] = draw(
                    st.sampled_from([np.nan, np.inf, -1.0, 256.0, 0.5, 3.0, 1e9]))
            elif kind == "truncate" and value.ndim:
                value = value[: draw(st.integers(0, max(len(value) - 1, 0)))]
            elif kind == "scale" and value.dtype.kind in "iuf":
                value = value / draw(st.sampled_from([255.0, 1.0, -1.0]))
            elif kind == "axis":
                flat = draw(st.booleans()) and value.ndim > 0 and value.size > 0
                value = value.reshape(len(value), -1) if flat else value[None]
        if target == "images":
            images = value
        else:
            labels = value
    return images, labels


@FAST
@given(data=images_and_labels())
# Grey images without their channel axis, labels that fit: the draws above rarely match
# labels to a 3-D array, which Split must refuse.
@example(data=(np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64)))
def test_random_split_arrays_are_accepted_or_give_a_whylook_error(data: tuple) -> None:
    images, labels = data
    split = expect_result_or_whylook_error(lambda: Split(images, labels))
    if split is not None:
        assert split.images.dtype == np.uint8
        assert split.images.ndim == 4  # (N, C, H, W)
        assert split.labels.dtype == np.int64
        assert split.labels.shape == (len(split.images),)


def _png(size: int, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), 90).save(buf, format="PNG")
    return buf.getvalue()


PARTS = st.sampled_from(
    ["train", "test", "a", "b", "c", "..", ".", "", "/", "C:", "__MACOSX", ".hidden", "x\\..",
     "deep"]
)
FILES = st.sampled_from(["0.png", "1.png", "x.jpg", "notes.txt", "2.PNG", ".DS_Store"])
CONTENT = st.sampled_from([_png(8, "L"), _png(8, "L"), _png(9, "L"), _png(8, "RGB"),
                           _png(8, "RGBA"), b"", b"junk"])
MEMBERS = st.lists(
    st.tuples(st.lists(PARTS, min_size=0, max_size=3), FILES, CONTENT), min_size=0, max_size=14
)


@pytest.mark.filterwarnings("ignore:Duplicate name")  # a zip may repeat a member name
@FAST
@given(members=MEMBERS, wrap=st.booleans())
def test_random_zip_trees_load_or_give_a_whylook_error_and_write_nothing(
    tmp_path: Path, members: list, wrap: bool
) -> None:
    root = tmp_path / "case"
    root.mkdir(exist_ok=True)
    archive = root / "data.zip"
    base = [("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")]
    with zipfile.ZipFile(archive, "w") as zf:
        entries = [([*b], "0.png", _png(8, "L")) for b in base] if wrap else []
        for parts, name, content in [*entries, *members]:
            zf.writestr("/".join([*parts, name]), content)
    before = sorted(root.rglob("*"))
    ds = expect_result_or_whylook_error(lambda: load_data(f"folder:{archive}"))
    if ds is not None:
        check_source(ds)
    assert sorted(root.rglob("*")) == before  # read in memory, never extracted
    archive.unlink()


# ----------------------------------------------------------------------------- analysis


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 3),
    )


NET = _tiny_net()


@FAST
@given(
    data=images_and_labels(channels=1),
    layer=st.sampled_from(["0", "1", "1", "2", "2", "3", "nope"]),
    batch_size=st.sampled_from([0, 1, 2, 4, 256]),
)
def test_random_grad_cam_inputs_give_a_result_or_a_whylook_error(
    data: tuple, layer: str, batch_size: int
) -> None:
    images, labels = data
    # The model is the caller's: its own errors (here, a convolution given 3 channels
    # instead of 1) propagate unchanged by design (tests/test_saliency.py).
    assume(not (images.ndim == 4 and images.shape[1] != 1))
    res = expect_result_or_whylook_error(
        lambda: grad_cam(NET, layer, images, labels, batch_size=batch_size, device="cpu")
    )
    if res is not None:
        n = len(images)
        assert res.saliency.shape[0] == n
        assert res.confidence.shape == (n, 3)
        if images.dtype.kind in "iu" or np.isfinite(images).all():
            assert np.isfinite(res.saliency).all()
            assert np.isfinite(res.confidence).all()


@pytest.fixture(scope="module")
def analysis_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the tiny run for every example: valid examples share its cache."""
    _, reference = baseline(tmp_path_factory)
    return copy_run(reference, tmp_path_factory.mktemp("properties") / "run")


ODD = st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True), st.booleans())
#: Per option: values to try in place of the valid one (some valid, most not).
ALTERNATIVES = {
    "k": st.one_of(st.sampled_from(["default", "auto", "many", ""]), st.integers(-2, 1000), ODD),
    "layer": st.one_of(st.none(), st.sampled_from(
        ["block3", "block2", "block1", "pool", "classifier", "classifier.fc1", "nope", ""])),
    "analysis_size": st.one_of(st.none(), st.sampled_from([-1, 0, 1, 2, 30, 61]), ODD),
    "prototype_size": st.one_of(st.none(), st.sampled_from([-1, 0, 2, 60, 61]), ODD),
    "seed": st.one_of(st.integers(-2, 2), ODD),
    "batch_size": st.one_of(st.integers(-1, 64), ODD),
    "shard_size": st.one_of(st.integers(-1, 64), ODD),
    "n_components": st.one_of(st.none(), st.integers(-1, 80), ODD),
    "min_cluster_size": st.one_of(st.none(), st.integers(-1, 70), ODD),
    "ridge_lambda": st.one_of(st.just("cv"), st.floats(allow_nan=True, allow_infinity=True),
                              st.text(max_size=3)),
    "bootstrap": st.one_of(st.integers(-1, 4), ODD),
    "standard_errors": st.sampled_from(["jackknife", "bootstrap", "none", ""]),
    "support": st.sampled_from(["global+class", "class", "global", "other"]),
    "subgroups": st.sampled_from(["trajectory+profile", "trajectory", "other"]),
    "precision": st.one_of(st.sampled_from(["float32", "bfloat16", "float16", ""]), ODD),
}
KEYWORDS = ("k", "layer", "analysis_size", "prototype_size", "seed")
#: A valid, quick analysis of the tiny run; examples change 0-2 of its options.
VALID = {"k": 3, "analysis_size": 30, "bootstrap": 10}


@st.composite
def explain_calls(draw: st.DrawFn) -> tuple[dict, ExplainSettings | None]:
    options = dict(VALID)
    for name in draw(st.lists(st.sampled_from(sorted(ALTERNATIVES)), max_size=2, unique=True)):
        options[name] = draw(ALTERNATIVES[name])
    keywords = {k: v for k, v in options.items() if k in KEYWORDS}
    fields = {k: v for k, v in options.items() if k not in KEYWORDS}
    try:
        return keywords, ExplainSettings(**fields)
    except WhylookError:  # a settings object that cannot even be made: pass none
        return keywords, None


@settings(FAST, max_examples=DEEP or 20)
@given(call=explain_calls())
def test_random_explain_options_give_an_explanation_or_a_whylook_error(
    analysis_run: Path, call: tuple[dict, ExplainSettings | None]
) -> None:
    keywords, explain_settings = call
    result = expect_result_or_whylook_error(
        lambda: explain(analysis_run, device="cpu", settings=explain_settings, progress=False,
                        **keywords),
        seconds=90,
    )
    if result is not None:
        n = int(result.data["settings"]["analysis_size"])
        assert result.arrays["saliency"].shape[:2] == (4, n)
        # The examples share the folder: the file must be this call's, not an earlier one's.
        saved = json.loads((analysis_run / "analysis" / "explanation.json").read_text())
        assert saved["settings"] == result.data["settings"]
