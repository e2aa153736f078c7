"""Analysis-performance benchmark: whylook's saliency stage and ``whylook explain`` against
Captum, pytorch-grad-cam and the floor, in one run, with ratios.

Usage::

    python benchmarks/bench_analysis.py              # full (CPU: ~10 min + a one-off training)
    python benchmarks/bench_analysis.py --quick      # small sizes, ~2-3 min
    python benchmarks/bench_analysis.py --threads 1  # the same thread count for everything
    python benchmarks/bench_analysis.py --model resnet50 --device cuda   # see gpu_bench.sh

Data: ``npz:../shared/data/mnist.npz`` beside the checkout when present, else ``mnist5k``
(``--data`` overrides). The checkpoints come from one ``whylook.train`` run (1 epoch, 24
checkpoints on the log schedule), trained once into ``--runs-dir`` (default
``/tmp/whylook-bench-runs``) and reused; subsets of its checkpoints (hard links) give the
12- and 3-checkpoint runs.

What is measured (all in one process unless said otherwise, on the same model, data,
checkpoints, batch size and threads; every contender is warmed up once, contenders are
interleaved and rotated, and medians of ``--repeats`` are reported):

1. **Saliency stage** in sample-checkpoints per second over T+1 checkpoints x n samples,
   models already loaded:

   * ``whylook``: :func:`whylook.grad_cam` (raw Grad-CAM + softmax confidences, numpy out).
   * ``floor``: per batch, the bare forward pass of the whole model with frozen parameters,
     the layer's output replaced by a leaf that requires grad, and one
     ``torch.autograd.grad`` of the summed true-class logits w.r.t. that leaf: the backward
     runs from the logits to the layer's output and no further, with no parameter
     gradients. No CAM, no softmax, no copy off the device. Measured in both memory layouts
     (NCHW and NHWC); the faster one is *the* floor.
   * ``captum``: ``captum.attr.LayerGradCam(model, layer).attribute(x, target=y,
     relu_attributions=True)``, with the logits caught by a forward hook (no second pass)
     for the softmax: the same two outputs as whylook. ``captum (NHWC model)`` is the same
     after ``model.to(memory_format=torch.channels_last)``, the layout whylook uses on CPU.
   * ``grad-cam``: ``pytorch_grad_cam.GradCAM`` with ``ClassifierOutputTarget`` per sample;
     confidences from ``cam.outputs``. It also upsamples and min-max normalises each map
     (part of what the package does).

   With ``--precision bfloat16`` also ``whylook (bfloat16)`` (``precision="bfloat16"``: the
   pass under ``torch.autocast``, the CAM and softmax in float32), the floor under the same
   autocast (``floor (bfloat16 autocast)``, and with the fused kernels on CPU), and
   ``captum (bfloat16 autocast)`` (LayerGradCam under ``torch.autocast``, which is how a
   Captum user would ask for bfloat16); plus how far the bfloat16 maps are from float32's.

2. **``whylook explain`` end to end** (fresh cache), broken down by stage by timing the
   functions explain calls (anything not covered is "other"), against the floor for the
   same T+1 checkpoints and n samples. Floor and explain alternate ``--repeats`` times
   (floor first and last) and the ratio is of their medians. Also a rerun with all shards
   cached. With ``--precision bfloat16`` a bfloat16 explain runs before each float32 one,
   and the floor under bfloat16 autocast beside the float32 floors.

3. **Peak memory of the prototype stage** at two prototype-set sizes (10k and 60k images, 6x),
   each in a fresh subprocess: explain on a 3-checkpoint run with a small analysis set and
   ``--prototype-size P``; growth = peak RSS (VmHWM, reset just before) minus the RSS just
   before explain (data and model already loaded).

4. **Scaling**: explain at (n, T+1), (2n, T+1) and (n, 2(T+1)); exponents
   ``log2(t(2x) / t(x))`` (1.0 = linear) for explain and for its saliency stage.

Writes ``benchmarks/results/analysis-<model>-<device>[-quick].json`` and ``.md`` (the
tables) and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

import whylook  # noqa: E402
from whylook import _fusion  # noqa: E402
from whylook._fusion import eager_layout, fused_conv_relu  # noqa: E402
from whylook._pooling import fast_max_pool  # noqa: E402
from whylook.data import to_tensor  # noqa: E402
from whylook.run import RunFolder  # noqa: E402
from whylook.saliency import _one_channel_nhwc  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """How much of everything one benchmark run uses."""

    limit_per_class: int | None  # training data per class (None: all)
    train_checkpoints: int  # checkpoints of the trained run (subsets are taken from it)
    saliency_checkpoints: int  # T+1 for the saliency comparison and the main explain
    saliency_n: int  # samples of the saliency comparison
    explain_n: int  # analysis set of the main explain (= 2 * scaling_n)
    scaling_n: int
    proto_sizes: tuple[int, int]  # prototype-set sizes of the memory test (6x apart)
    memory_analysis_n: int
    repeats: int


FULL = Sizes(None, 24, 12, 1000, 2000, 1000, (10_000, 60_000), 200, 3)
QUICK = Sizes(300, 8, 4, 256, 256, 128, (300, 1_800), 60, 2)


# ----------------------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(threads: int, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "whylook": whylook.__version__,
        "device": str(device),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("captum", "grad-cam", "scikit-learn", "numpy"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    return info


def write_result(out: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's raw result to ``out`` (JSON) with the command that made it."""
    result.setdefault("command", "python benchmarks/" + " ".join(
        [Path(sys.argv[0]).name, *sys.argv[1:]]))
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written: {out}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- runs


def default_data() -> str:
    return f"npz:{SHARED_MNIST}" if SHARED_MNIST.is_file() else "mnist5k"


def ensure_run(data: str, model: str, sizes: Sizes, runs_dir: Path, device: str) -> RunFolder:
    """The benchmark's trained run (trained once, then reused)."""
    from whylook.data import load_data
    from whylook.train import train

    tag = "".join(c if c.isalnum() else "-" for c in data.rsplit("/", 1)[-1])
    path = runs_dir / f"{model}-{tag}-l{sizes.limit_per_class}-c{sizes.train_checkpoints}"
    if (path / "run.json").is_file():
        return RunFolder.open(path)
    if path.exists():
        shutil.rmtree(path)  # an interrupted training
    print(f"training the benchmark run into {path} (once; reused afterwards) ...", flush=True)
    start = time.perf_counter()
    source = load_data(data, limit_per_class=sizes.limit_per_class)
    run = train(source, model, epochs=1, checkpoints=sizes.train_checkpoints, out=path,
                device=device, progress=False)
    print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
    return run


def spread(count: int, total: int) -> list[int]:
    """``count`` checkpoint indices spread evenly over ``total``, both ends included."""
    return sorted({round(float(x)) for x in np.linspace(0, total - 1, count)})


def subset_run(run: RunFolder, indices: Sequence[int], dst: Path) -> RunFolder:
    """A run folder holding only the checkpoints ``indices`` of ``run`` (hard links)."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "checkpoints").mkdir(parents=True)
    manifest = json.loads((run.path / "run.json").read_text())
    records = []
    for new, old in enumerate(indices):
        record = dict(manifest["checkpoints"][old])
        src = run.path / record["file"]
        record["index"], record["file"] = new, f"checkpoints/ckpt-{new:04d}.safetensors"
        try:
            os.link(src, dst / record["file"])
        except OSError:
            shutil.copyfile(src, dst / record["file"])
        records.append(record)
    manifest["checkpoints"] = records
    (dst / "run.json").write_text(json.dumps(manifest, indent=2))
    return RunFolder.open(dst)


def load_models(run: RunFolder, device: torch.device) -> list[nn.Module]:
    return [run.load_model(i, device=str(device)) for i in range(len(run.checkpoints))]


# ----------------------------------------------------------------------------- contenders


def contender_images(images: np.ndarray) -> np.ndarray:
    """The rows every contender reads, as one array; one-channel images with NHWC strides.

    torch reads a one-channel batch with the default strides ``(H*W, H*W, W, 1)`` as NCHW,
    so oneDNN's first convolution writes NCHW and the pooling after it runs in NCHW: on
    ``smallcnn`` the passes of Captum, the floors and (before it re-strided its batches)
    whylook ran 1.2x slower than from strides ``(H*W, 1, W, 1)``, the same bytes. Gathered
    rows of the decoded MNIST npz came with the second kind (its array is ``x[:, None]``);
    rows of the decoded-data cache come with the first. Every run since 2026-12-06 21:13
    UTC gives all contenders the second, the faster for each of them, whatever the source.
    """
    images = np.array(images)  # a copy of the rows, writable (torch.from_numpy warns otherwise)
    # whylook's own rule for its batches, applied once to the whole array.
    return _one_channel_nhwc(torch.from_numpy(images)).numpy()


def _batches(images: np.ndarray, labels: np.ndarray, bs: int, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same input preparation for every contender: uint8 -> float [0, 1] on the device."""
    y_all = torch.from_numpy(labels)
    for lo in range(0, len(images), bs):
        x = torch.from_numpy(images[lo:lo + bs]).to(device).float().div_(255.0)
        yield x, y_all[lo:lo + bs].to(device)


#: whylook's memory layout in the saliency section: None = its automatic choice (NHWC on
#: CPU), True / False to force it (``--whylook-layout``).
WHYLOOK_CHANNELS_LAST: bool | None = None


def run_whylook(models: list[nn.Module], layer: str, images: np.ndarray, labels: np.ndarray,
                bs: int, device: torch.device, channels_last: bool | None = None,
                fuse: bool | None = None, precision: str = "float32",
                blocked: bool = True) -> Any:
    """whylook's passes; ``blocked=False``: without the runs in oneDNN's blocked layout
    (whylook/_fusion.py), its CPU kernels before 2026-12-06 23:00 UTC."""
    out = None
    layout = WHYLOOK_CHANNELS_LAST if channels_last is None else channels_last
    with _without_blocked_runs(not blocked):
        for m in models:
            res = whylook.grad_cam(m, layer, images, labels, batch_size=bs, device=device,
                                   channels_last=layout, fuse=fuse, precision=precision)
            out = out if out is not None else res.saliency
    return out


@contextlib.contextmanager
def _without_blocked_runs(off: bool) -> Iterator[None]:
    if not off:
        yield
        return
    real = _fusion._blocked_available
    _fusion._blocked_available = lambda: False
    try:
        yield
    finally:
        _fusion._blocked_available = real


@contextlib.contextmanager
def _layout(model: nn.Module, nhwc: bool) -> Iterator[None]:
    if not nhwc:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def run_floor(models: list[nn.Module], layer: str, images: np.ndarray, labels: np.ndarray,
              bs: int, device: torch.device, nhwc: bool, fused: bool = False,
              bf16: bool = False) -> None:
    """Bare forward + backward from the true-class logits to the layer's output (see top).

    ``fused``: the same pass with whylook's CPU kernels before the layer (runs of
    Conv2d/ReLU/MaxPool2d on oneDNN's blocked tensors, else Conv2d -> ReLU pairs as one
    kernel, and 2x2 max-pooling without indices), so that whylook's own kernel choice is not
    counted as a gain over the floor. ``bf16``: the
    pass under bfloat16 autocast, as whylook's ``precision="bfloat16"`` runs it (the leaf
    in float32, as whylook hands it over)."""
    for m in models:
        module = dict(m.named_modules())[layer]
        flags = [p.requires_grad for p in m.parameters()]
        for p in m.parameters():
            p.requires_grad_(False)
        store: dict[str, torch.Tensor] = {}

        def leaf(mod: nn.Module, _i: Any, out: torch.Tensor, store: dict = store) -> torch.Tensor:
            # whylook's blocked run hands the layer's output to its hook in NCHW where
            # eager gives NHWC: the network gets the leaf in that layout, as a copy.
            layout = eager_layout(mod, out)
            if bf16:
                out = out.float()
            store["a"] = out.detach().requires_grad_(True)
            return store["a"] if layout is None else store["a"].clone(memory_format=layout)

        handle = module.register_forward_hook(leaf)
        try:
            with _layout(m, nhwc), (fused_conv_relu(m, keep=(module,), takes_blocked=(module,))
                                    if fused else contextlib.nullcontext()):
                for x, y in _batches(images, labels, bs, device):
                    if nhwc:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with (fast_max_pool() if fused else contextlib.nullcontext()), \
                            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = m(x)
                    torch.autograd.grad(logits.gather(1, y[:, None]).sum(), store["a"])
        finally:
            handle.remove()
            for p, f in zip(m.parameters(), flags, strict=True):
                p.requires_grad_(f)
    sync(device)


def run_captum(models: list[nn.Module], layer: str, images: np.ndarray, labels: np.ndarray,
               bs: int, device: torch.device, nhwc: bool = False, second_pass: bool = False,
               bf16: bool = False) -> Any:
    """Captum's LayerGradCam plus softmax confidences: from logits caught by a hook on the
    model (favourable to Captum), or (``second_pass``) from a separate no-grad forward pass,
    which is what Captum's API offers (``attribute`` returns no logits). ``bf16``: all of it
    under bfloat16 autocast."""
    if bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = run_captum(models, layer, images, labels, bs, device, nhwc, second_pass)
        return out
    from captum.attr import LayerGradCam

    out = None
    for m in models:
        if second_pass:
            lgc = LayerGradCam(m, dict(m.named_modules())[layer])
            for x, y in _batches(images, labels, bs, device):
                sal = lgc.attribute(x, target=y, relu_attributions=True)[:, 0].detach().float()
                with torch.no_grad():
                    torch.softmax(m(x), 1).cpu().numpy()
                out = out if out is not None else sal.cpu().numpy()
            continue
        caught: dict[str, torch.Tensor] = {}

        def catch(_m: nn.Module, _i: Any, out: torch.Tensor, caught: dict = caught) -> None:
            caught["logits"] = out

        handle = m.register_forward_hook(catch)
        try:
            with _layout(m, nhwc):
                lgc = LayerGradCam(m, dict(m.named_modules())[layer])
                for x, y in _batches(images, labels, bs, device):
                    if nhwc:
                        x = x.contiguous(memory_format=torch.channels_last)
                    attr = lgc.attribute(x, target=y, relu_attributions=True)
                    sal = attr[:, 0].detach().float().cpu().numpy()
                    torch.softmax(caught["logits"].detach().float(), 1).cpu().numpy()
                    out = out if out is not None else sal
        finally:
            handle.remove()
    return out


def run_gradcam(models: list[nn.Module], layer: str, images: np.ndarray, labels: np.ndarray,
                bs: int, device: torch.device) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    for m in models:
        with GradCAM(model=m, target_layers=[dict(m.named_modules())[layer]]) as cam:
            for x, y in _batches(images, labels, bs, device):
                cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in y])
                torch.softmax(cam.outputs.detach(), 1).cpu().numpy()


def _auto_nhwc(device: torch.device) -> bool:
    if WHYLOOK_CHANNELS_LAST is not None:
        return WHYLOOK_CHANNELS_LAST
    return device.type == "cpu"  # whylook's automatic choice (saliency._use_channels_last)


def available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def bench_saliency(run: RunFolder, models: list[nn.Module], sizes: Sizes, device: torch.device,
                   bs: int, precision: str = "float32") -> dict[str, Any]:
    """Section 1: the saliency stage of every contender, interleaved and repeated."""
    from whylook.explain import stratified_rows

    layer = run.layer
    train = run.data().train
    rows = stratified_rows(train.labels, sizes.saliency_n, seed=0)
    images = contender_images(train.images[rows])
    labels = train.labels[rows].astype(np.int64)
    work = len(models) * len(rows)

    def call(fn: Callable[..., Any], **kw: Any) -> Callable[[list[nn.Module], np.ndarray,
                                                              np.ndarray], Any]:
        return lambda ms, im, lb: fn(ms, layer, im, lb, bs, device, **kw)

    contenders: dict[str, Callable[[list[nn.Module], np.ndarray, np.ndarray], Any]] = {
        "whylook": call(run_whylook),
        # The other layout, to show what whylook's layout choice is worth here.
        "whylook (other layout)": call(run_whylook, channels_last=not _auto_nhwc(device)),
        "whylook (unfused)": call(run_whylook, fuse=False),
        "whylook (fused pairs in NHWC)": call(run_whylook, blocked=False),
        "floor (NHWC)": call(run_floor, nhwc=True),
        "floor (NCHW)": call(run_floor, nhwc=False),
    }
    if device.type == "cpu":
        contenders["floor (NHWC, fused)"] = call(run_floor, nhwc=True, fused=True)
    if available("captum"):
        contenders["captum"] = call(run_captum)
        contenders["captum (NHWC model)"] = call(run_captum, nhwc=True)
        contenders["captum, 2nd pass for softmax"] = call(run_captum, second_pass=True)
    else:
        print("captum is not installed (pip install -e '.[bench]'): skipped")
    if available("pytorch_grad_cam"):
        contenders["grad-cam"] = call(run_gradcam)
    else:
        print("grad-cam is not installed (pip install -e '.[bench]'): skipped")
    bf16 = precision == "bfloat16"
    if bf16:
        contenders["whylook (bfloat16)"] = call(run_whylook, precision="bfloat16")
        contenders["floor (bfloat16 autocast)"] = call(run_floor, nhwc=_auto_nhwc(device),
                                                                bf16=True)
        if device.type == "cpu":
            # whylook fuses Conv2d -> ReLU in bfloat16 too (whylook/_fusion.py).
            contenders["floor (bfloat16 autocast, fused)"] = call(
                run_floor, nhwc=_auto_nhwc(device), bf16=True, fused=True)
        if available("captum"):
            contenders["captum (bfloat16 autocast)"] = call(run_captum, nhwc=_auto_nhwc(device),
                                                            bf16=True)

    # Agreement: whylook's raw maps equal Captum's LayerGradCam (up to float rounding).
    agreement = None
    if "captum" in contenders:
        a = run_whylook(models[-1:], layer, images[:bs], labels[:bs], bs, device)
        b = run_captum(models[-1:], layer, images[:bs], labels[:bs], bs, device)
        agreement = float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))
    bf16_agreement = None
    if bf16:
        # How far bfloat16 moves the maps: over the samples of every checkpoint, the
        # correlation with float32's and the largest difference relative to the largest value.
        a = np.concatenate([run_whylook([m], layer, images, labels, bs, device) for m in models])
        b = np.concatenate([run_whylook([m], layer, images, labels, bs, device,
                                        precision="bfloat16") for m in models])
        bf16_agreement = {
            "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "max_rel_diff": float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12)),
        }
    for fn in contenders.values():  # warm-up: one model, one batch
        fn(models[-1:], images[:bs], labels[:bs])

    times: dict[str, list[float]] = defaultdict(list)
    names = list(contenders)
    for r in range(sizes.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate against drift
        for name in order:
            gc.collect()
            sync(device)
            start = time.perf_counter()
            contenders[name](models, images, labels)
            sync(device)
            times[name].append(time.perf_counter() - start)
            print(f"  saliency {name:22s} {times[name][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_name = min(("floor (NHWC)", "floor (NCHW)"), key=med.__getitem__)
    # The strict comparison: Captum with the hook (its fastest way to both outputs).
    # Captum in either layout (whylook's NHWC choice applied to Captum counts for Captum).
    rivals = [k for k in ("captum", "captum (NHWC model)", "grad-cam") if k in med]
    fastest_rival = min(rivals, key=med.__getitem__) if rivals else None
    plain = [k for k in ("captum, 2nd pass for softmax", "grad-cam") if k in med]
    fastest_plain = min(plain, key=med.__getitem__) if plain else None
    return {
        "checkpoints": len(models),
        "n": len(rows),
        "batch_size": bs,
        "layer": layer,
        "work": work,
        "seconds": dict(times),
        "median_seconds": med,
        "best_seconds": {k: min(v) for k, v in times.items()},
        "rate": {k: work / v for k, v in med.items()},
        "floor": floor_name,
        "fastest_rival": fastest_rival,
        "speedup_vs_fastest_rival": (med[fastest_rival] / med["whylook"]
                                     if fastest_rival else None),
        "fastest_plain_rival": fastest_plain,
        "speedup_vs_fastest_plain_rival": (med[fastest_plain] / med["whylook"]
                                           if fastest_plain else None),
        "whylook_over_floor": med["whylook"] / med[floor_name],
        "whylook_over_fused_floor": (med["whylook"] / med["floor (NHWC, fused)"]
                                     if "floor (NHWC, fused)" in med else None),
        "max_rel_diff_vs_captum": agreement,
        "bfloat16": None if not bf16 else {
            "speedup_vs_fastest_rival": (med[fastest_rival] / med["whylook (bfloat16)"]
                                         if fastest_rival else None),
            "speedup_vs_captum_bfloat16": (
                med["captum (bfloat16 autocast)"] / med["whylook (bfloat16)"]
                if "captum (bfloat16 autocast)" in med else None),
            "over_float32_floor": med["whylook (bfloat16)"] / med[floor_name],
            "over_bfloat16_floor": (med["whylook (bfloat16)"]
                                    / med["floor (bfloat16 autocast)"]),
            "over_bfloat16_fused_floor": (
                med["whylook (bfloat16)"] / med["floor (bfloat16 autocast, fused)"]
                if "floor (bfloat16 autocast, fused)" in med else None),
            "speedup_vs_whylook_float32": med["whylook"] / med["whylook (bfloat16)"],
            "maps_vs_float32": bf16_agreement,
        },
    }


# ----------------------------------------------------------------------------- explain


class StageClock:
    """Times the functions ``explain`` calls, by patching them for the duration.

    Generators are timed step by step, so work their consumer does between steps (e.g.
    K-Means statistics between feature batches) is not counted twice. Nested timed calls
    count only once, in the outermost stage.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.system: dict[str, float] = defaultdict(float)
        self._busy = False
        self._patches: list[tuple[Any, str, Any]] = []

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        if self._busy:
            return fn()
        self._busy = True
        start, kernel = time.perf_counter(), os.times().system
        try:
            return fn()
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.system[stage] += os.times().system - kernel
            self._busy = False

    def patch(self, owner: Any, name: str, stage: str, *, generator: bool = False) -> None:
        if not hasattr(owner, name):
            # A stage that silently goes untimed would be counted as "other".
            raise RuntimeError(f"cannot time {stage!r}: {owner!r} has no {name!r}")
        orig = getattr(owner, name)
        clock = self

        if generator:
            def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
                it = clock._timed(stage, lambda: iter(orig(*args, **kwargs)))
                while True:
                    try:
                        item = clock._timed(stage, lambda: next(it))
                    except StopIteration:
                        return
                    yield item
        else:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return clock._timed(stage, lambda: orig(*args, **kwargs))

        setattr(owner, name, wrapper)
        self._patches.append((owner, name, orig))

    def __enter__(self) -> StageClock:
        import importlib

        import whylook.intensity as inten
        import whylook.mapping as mapping
        import whylook.patterns as patterns
        import whylook.saliency as sal
        from whylook.prototypes import PrototypeFinder, Prototypes

        # Not ``import whylook.explain as ex``: that binds the package's explain function,
        # which has none of these attributes.
        ex = importlib.import_module("whylook.explain")
        self.patch(RunFolder, "data", "load data")
        self.patch(RunFolder, "load_model", "load checkpoints")
        self.patch(ex, "_checkpoint_model", "load checkpoints")
        self.patch(ex, "file_digest", "checkpoint digests")
        self.patch(PrototypeFinder, "partial_fit", "prototypes: feature statistics")
        self.patch(PrototypeFinder, "finalize", "prototypes: PCA + K-Means")
        self.patch(sal, "layer_features", "prototypes: feature pass", generator=True)
        self.patch(Prototypes, "assign", "assignments")
        self.patch(sal.GradCAM, "batches", "saliency (Grad-CAM, T+1 passes)", generator=True)
        self.patch(sal.GradCAM, "batches_with_features", "saliency (Grad-CAM, T+1 passes)",
                   generator=True)
        self.patch(ex, "_load_cached", "cache reads")
        self.patch(ex, "save_npz", "writes (cache shards, arrays.npz)")
        self.patch(ex, "json_bytes", "writes (cache shards, arrays.npz)")
        self.patch(ex, "write_bytes", "writes (cache shards, arrays.npz)")
        for fn in ("prototype_intensity", "mass_share", "activity"):
            self.patch(inten, fn, "intensity")
        self.patch(patterns, "find_patterns", "patterns (HDBSCAN)")
        self.patch(mapping, "fit_mapping", "mapping (ridge + standard errors)")
        self.patch(mapping, "fit_class_mapping", "mapping (ridge + standard errors)")
        self.patch(ex, "assemble", "structure")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, orig in reversed(self._patches):
            setattr(owner, name, orig)
        self._patches.clear()


def timed_explain(run: RunFolder, device: torch.device, *, fresh: bool = True,
                  system: dict[str, float] | None = None, **kwargs: Any
                  ) -> tuple[float, dict[str, float]]:
    """Seconds of a whole explain and of each stage; ``system`` (optional) receives each
    stage's system CPU seconds."""
    if fresh:
        shutil.rmtree(run.path / "analysis", ignore_errors=True)
    # whylook.data keeps loaded data sources in memory; a CLI user's explain loads the data
    # from disk, so the benchmark does too.
    import whylook.data

    getattr(whylook.data, "_CACHE", {}).clear()
    gc.collect()
    with StageClock() as clock:
        start = time.perf_counter()
        whylook.explain(run, device=str(device), progress=False, **kwargs)
        sync(device)
        total = time.perf_counter() - start
    stages = dict(clock.seconds)
    stages["other"] = total - sum(stages.values())
    if system is not None:
        system.update(clock.system)
    return total, stages


def explain_floor(run: RunFolder, models: list[nn.Module], n: int, device: torch.device,
                  bs: int, nhwc: bool, fused: bool = False, bf16: bool = False) -> float:
    """The floor of an explain: one bare saliency pass per sample per checkpoint."""
    from whylook.explain import stratified_rows

    train = run.data().train
    rows = stratified_rows(train.labels, n, seed=0)
    images = contender_images(train.images[rows])
    gc.collect()
    start = time.perf_counter()
    run_floor(models, run.layer, images, train.labels[rows].astype(np.int64), bs, device, nhwc,
              fused=fused, bf16=bf16)
    return time.perf_counter() - start


def import_seconds() -> float:
    """Python import time of the analysis modules in a fresh process (a CLI pays it once;
    the in-process explain timings below exclude it)."""
    code = ("import time; t = time.perf_counter(); import whylook.explain, whylook.patterns, "
            "whylook.mapping, whylook.prototypes, whylook.run; print(time.perf_counter() - t)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=False)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def bench_explain(run: RunFolder, models: list[nn.Module], n: int, device: torch.device,
                  bs: int, nhwc: bool, repeats: int, precision: str = "float32"
                  ) -> dict[str, Any]:
    """Section 2: explain end to end by stage, against the floor measured around it.

    Floor and explain alternate (floor, explain, floor, explain, ..., floor) and the
    ratio is of their medians: on a shared machine one floor run alone swung from 4.9 s
    to 8.6 s within a minute, which made a single before/after pair misleading.
    """
    explain_floor(run, models[-1:], 256, device, bs, nhwc)  # warm-up
    # On CPU also the floor with whylook's own kernels (fused Conv2d -> ReLU, pooling), so the ratio
    # can be read against the same kernels as well.
    fused = device.type == "cpu"
    floors: list[float] = []
    fused_floors: list[float] = []
    bf16 = precision == "bfloat16"
    bf16_floors: list[float] = []
    bf16_fused_floors: list[float] = []

    # Each run's CPU time, user and system: on a virtual machine the kernel's time for the
    # same work (page faults of fresh memory) swung from 0.3 s to 3.4 s between runs, and
    # this says which runs paid it. With 1 thread, user time is the steadier reading.
    cpu: dict[str, list[tuple[float, float]]] = {"explain": [], "floor": []}
    system: list[dict[str, float]] = []

    def floor_pair(label: str) -> None:
        with cpu_seconds(cpu["floor"]):
            floors.append(explain_floor(run, models, n, device, bs, nhwc))
        text = f"  {label} (T+1={len(models)}, n={n}) {floors[-1]:.2f} s"
        if fused:
            fused_floors.append(explain_floor(run, models, n, device, bs, nhwc, fused=True))
            text += f", fused {fused_floors[-1]:.2f} s"
        if bf16:
            bf16_floors.append(explain_floor(run, models, n, device, bs, nhwc, bf16=True))
            text += f", bfloat16 {bf16_floors[-1]:.2f} s"
            if fused:
                bf16_fused_floors.append(explain_floor(run, models, n, device, bs, nhwc,
                                                       fused=True, bf16=True))
                text += f", bfloat16 fused {bf16_fused_floors[-1]:.2f} s"
        print(text, flush=True)

    runs: list[tuple[float, dict[str, float]]] = []
    bf16_runs: list[tuple[float, dict[str, float]]] = []
    for r in range(repeats):
        floor_pair("floor")
        system.append({})
        if bf16:
            # Before the float32 explain: the cached rerun below reads float32's shards.
            bf16_runs.append(timed_explain(
                run, device, analysis_size=n,
                settings=whylook.ExplainSettings(precision="bfloat16")))
            print(f"  explain, bfloat16 {bf16_runs[-1][0]:.2f} s", flush=True)
        with cpu_seconds(cpu["explain"]):
            runs.append(timed_explain(run, device, analysis_size=n, system=system[-1]))
        print(f"  explain {runs[-1][0]:.2f} s (repeat {r + 1} of {repeats})", flush=True)
    floor_pair("floor again")
    cached_total, cached_stages = timed_explain(run, device, fresh=False, analysis_size=n)
    print(f"  explain, all shards cached {cached_total:.2f} s", flush=True)
    # The explains above read the decoded data from disk, as every command after the run's
    # `whylook train` does (the floors' loads warmed it); one more decodes it as the first
    # load of a source does.
    with _env("WHYLOOK_CACHE", "off"):
        decode_total, decode_stages = timed_explain(run, device, analysis_size=n)
    print(f"  explain, data decoded (WHYLOOK_CACHE=off) {decode_total:.2f} s", flush=True)
    total, stages = _median_stages(runs)
    floor = float(np.median(floors))
    bf16_result = None
    if bf16:
        bf16_total, bf16_stages = _median_stages(bf16_runs)
        bf16_floor = float(np.median(bf16_floors))
        bf16_result = {
            "seconds": bf16_total, "seconds_all": [t for t, _ in bf16_runs],
            "stages": bf16_stages, "floor_seconds": bf16_floors, "floor": bf16_floor,
            "over_float32_floor": bf16_total / floor,
            "over_bfloat16_floor": bf16_total / bf16_floor,
            "fused_floor_seconds": bf16_fused_floors,
            "over_bfloat16_fused_floor": (bf16_total / float(np.median(bf16_fused_floors))
                                          if bf16_fused_floors else None),
        }
    return {
        "checkpoints": len(models),
        "n": n,
        "seconds": total,
        "seconds_all": [t for t, _ in runs],
        "stages": stages,
        "stages_all": [st for _, st in runs],
        "floor_seconds": floors,
        "floor": floor,
        "over_floor": total / floor,
        "fused_floor_seconds": fused_floors,
        "fused_floor": float(np.median(fused_floors)) if fused_floors else None,
        "over_fused_floor": total / float(np.median(fused_floors)) if fused_floors else None,
        "cpu_seconds": cpu,
        "stages_system_all": system,
        "over_floor_user_cpu": (float(np.median([u for u, _ in cpu["explain"]]))
                                / float(np.median([u for u, _ in cpu["floor"]]))),
        "cached_seconds": cached_total,
        "data_decoded_seconds": decode_total,
        "data_decoded_stages": decode_stages,
        "cached_stages": cached_stages,
        "import_seconds": import_seconds(),
        "bfloat16": bf16_result,
    }


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` for the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def cpu_seconds(into: list[tuple[float, float]]) -> Iterator[None]:
    """Append the user and system CPU time the process spent in the block to ``into``."""
    start = os.times()
    try:
        yield
    finally:
        end = os.times()
        into.append((end.user - start.user, end.system - start.system))


def _median_stages(runs: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """The median total, and per stage the median over repeats; "other" absorbs the
    difference so the stages still add up to the median total."""
    total = float(np.median([t for t, _ in runs]))
    names = sorted({name for _, st in runs for name in st})
    stages = {name: float(np.median([st.get(name, 0.0) for _, st in runs])) for name in names
              if name != "other"}
    stages["other"] = total - sum(stages.values())
    return total, stages


# ----------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(run_path: str, proto_size: int, analysis_n: int, device: str) -> None:
    """In a fresh process: the prototype stage's peak-RSS growth (prints one JSON line)."""
    dev = torch.device(device)
    run = RunFolder.open(run_path)
    run.data()  # loaded (and cached by whylook.data) before the baseline
    # Imports are not the stage's memory: done before the baseline.
    import sklearn.cluster  # noqa: F401

    import whylook.mapping
    import whylook.patterns  # noqa: F401

    shutil.rmtree(run.path / "analysis", ignore_errors=True)
    if dev.type == "cuda":
        # The CUDA context, cuDNN and cuBLAS take GBs of host memory at their first use;
        # they belong to the process, not to the stage, so one pass is made before the
        # baseline.
        warm = run.load_model(len(run.checkpoints) - 1, device=device)
        x = to_tensor(np.asarray(run.data().train.images[:2])).to(dev)
        warm(x.requires_grad_()).sum().backward()
        del warm, x
        torch.cuda.synchronize(dev)
    gc.collect()
    try:  # "5" resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = _rss_kib("VmRSS")
    total, stages = timed_explain(run, dev, analysis_size=analysis_n, prototype_size=proto_size)
    peak = _rss_kib("VmHWM")
    out = {
        "prototype_size": proto_size,
        "baseline_rss_mib": base / 1024,
        "peak_rss_mib": peak / 1024,
        "growth_mib": (peak - base) / 1024,
        "peak_reset": reset,
        "explain_seconds": total,
        "prototype_seconds": sum(v for k, v in stages.items() if k.startswith("prototypes")),
        "stages": stages,
    }
    if dev.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    print("MEMORY-RESULT " + json.dumps(out), flush=True)


def bench_memory(run: RunFolder, sizes: Sizes, threads: int, device: torch.device,
                 runs_dir: Path) -> dict[str, Any]:
    """Section 3: prototype-stage peak memory at two prototype-set sizes (subprocesses)."""
    small = subset_run(run, spread(3, len(run.checkpoints)), runs_dir / "memory-3ckpt")
    n_train = len(run.data().train)
    results = []
    for p in sizes.proto_sizes:
        if p > n_train:
            print(f"  prototype set {p} > {n_train} training images: skipped")
            continue
        cmd = [sys.executable, __file__, "--threads", str(threads), "--device", str(device),
               "--memory-child", str(small.path), str(p), str(sizes.memory_analysis_n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in proc.stdout.splitlines() if x.startswith("MEMORY-RESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory child failed:\n{proc.stdout}\n{proc.stderr}")
        res = json.loads(line[-1].split(" ", 1)[1])
        print(f"  prototype set {p}: growth {res['growth_mib']:.0f} MiB, prototype stage "
              f"{res['prototype_seconds']:.1f} s", flush=True)
        results.append(res)
    ratio = (results[1]["growth_mib"] / results[0]["growth_mib"]
             if len(results) == 2 and results[0]["growth_mib"] > 0 else None)
    return {"runs": results, "growth_ratio": ratio,
            "size_ratio": sizes.proto_sizes[1] / sizes.proto_sizes[0]}


# ----------------------------------------------------------------------------- scaling


def bench_scaling(run24: RunFolder, run12: RunFolder, sizes: Sizes, device: torch.device
                  ) -> dict[str, Any]:
    """Section 4: explain at (n, T+1), (2n, T+1) and (n, 2(T+1)).

    The points run in the order A B C C B A and each takes the faster of its two runs:
    other work on a shared machine only ever adds time, and a load spike during one run
    (two OpenMP threads on two busy cores can run 5x slower) would otherwise decide the
    exponent. All runs are kept in the JSON.
    """
    n = sizes.scaling_n
    plan = {"base": (run12, n), "2n": (run12, 2 * n), "2T": (run24, n)}
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name in ["base", "2n", "2T", "2T", "2n", "base"]:
        run, size = plan[name]
        total, stages = timed_explain(run, device, analysis_size=size)
        runs[name].append((total, stages.get("saliency (Grad-CAM, T+1 passes)", 0.0)))
        print(f"  scaling {name}: n={size}, T+1={len(run.checkpoints)}: {total:.2f} s",
              flush=True)
    points = {
        name: {"n": plan[name][1], "checkpoints": len(plan[name][0].checkpoints),
               "seconds": min(t for t, _ in runs[name]),
               "saliency_seconds": min(s for _, s in runs[name]),
               "runs": runs[name]}
        for name in plan
    }

    def exponent(key: str, other: str, factor: float) -> float:
        return math.log(points[other][key] / points["base"][key]) / math.log(factor)

    n_factor = points["2n"]["n"] / points["base"]["n"]
    t_factor = points["2T"]["checkpoints"] / points["base"]["checkpoints"]
    return {
        "points": points,
        "exponent_n": exponent("seconds", "2n", n_factor),
        "exponent_T": exponent("seconds", "2T", t_factor),
        "saliency_exponent_n": exponent("saliency_seconds", "2n", n_factor),
        "saliency_exponent_T": exponent("saliency_seconds", "2T", t_factor),
    }


# ----------------------------------------------------------------------------- report


def _cpu_text(runs: list[tuple[float, float]]) -> str:
    return " / ".join(f"{u:.2f} + {k:.2f}" for u, k in runs)


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_cores']} cores), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; torch {m['torch']}, {m['threads']} thread(s) for every contender (torch and "
        f"BLAS/OpenMP); load average {m['load_average_start']} at start, "
        f"{m.get('load_average_end')} at the end; {m['date']}.",
        f"Command: `{res['command']}`; data `{res['data']}`, model `{res['model']}`.",
        "",
    ]
    s = res.get("saliency")
    if s:
        lines += [
            f"**Saliency stage**: T+1 = {s['checkpoints']} checkpoints x n = {s['n']} samples, "
            f"batch {s['batch_size']}, layer `{s['layer']}`, models loaded beforehand; median "
            f"of {len(next(iter(s['seconds'].values())))} interleaved repeats.",
            "",
            "| contender | sample·checkpoints/s | seconds: median (best) | whylook speed-up: "
            "median (best) |",
            "|---|---:|---:|---:|",
        ]
        best = s["best_seconds"]
        for name, sec in sorted(s["median_seconds"].items(), key=lambda kv: kv[1]):
            mark = " (floor)" if name == s["floor"] else ""
            lines.append(f"| {name}{mark} | {s['rate'][name]:.0f} | {sec:.2f} ({best[name]:.2f}) | "
                         f"{sec / s['median_seconds']['whylook']:.2f}x "
                         f"({best[name] / best['whylook']:.2f}x) |")
        if s["speedup_vs_fastest_rival"] is not None:
            lines.append("")
            lines.append(f"whylook is {s['speedup_vs_fastest_rival']:.2f}x the faster of Captum "
                         f"(logits by a hook) and grad-cam ({s['fastest_rival']}), "
                         f"{s['speedup_vs_fastest_plain_rival']:.2f}x the faster of the two as "
                         f"their APIs are used ({s['fastest_plain_rival']}); whylook / floor = "
                         f"{s['whylook_over_floor']:.2f}"
                         + (f" (against the floor with whylook's fused kernels: "
                            f"{s['whylook_over_fused_floor']:.2f})"
                            if s.get("whylook_over_fused_floor") else "")
                         + f"; max relative difference of the maps "
                         f"vs Captum {s['max_rel_diff_vs_captum']:.1e}.")
        b = s.get("bfloat16")
        if b:
            agree = b["maps_vs_float32"]
            lines.append("")
            lines.append(
                f"bfloat16: whylook (bfloat16) is {b['speedup_vs_whylook_float32']:.2f}x "
                "whylook in float32, "
                + (f"{b['speedup_vs_fastest_rival']:.2f}x the faster float32 rival, "
                   if b["speedup_vs_fastest_rival"] else "")
                + (f"{b['speedup_vs_captum_bfloat16']:.2f}x Captum under bfloat16 autocast, "
                   if b["speedup_vs_captum_bfloat16"] else "")
                + f"{b['over_float32_floor']:.2f}x the float32 floor and "
                f"{b['over_bfloat16_floor']:.2f}x its own floor"
                + (f" ({b['over_bfloat16_fused_floor']:.2f}x with the fused kernels)"
                   if b.get("over_bfloat16_fused_floor") else "")
                + "; its maps against float32's: "
                f"correlation {agree['correlation']:.5f}, max relative difference "
                f"{agree['max_rel_diff']:.1e}.")
        lines.append("")
    e = res.get("explain")
    if e:
        lines += [
            f"**`whylook explain` end to end** (fresh cache): T+1 = {e['checkpoints']}, "
            f"n = {e['n']}; floor and explain alternate, medians (stages: the median of each "
            "stage over the repeats).",
            "",
            "| stage | seconds | share | of it, system CPU (each repeat) |",
            "|---|---:|---:|---|",
        ]
        kernel = e.get("stages_system_all") or []
        for name, sec in sorted(e["stages"].items(), key=lambda kv: -kv[1]):
            of = " / ".join(f"{k.get(name, 0.0):.2f}" for k in kernel) if name != "other" else ""
            lines.append(f"| {name} | {sec:.2f} | {100 * sec / e['seconds']:.0f}% | {of} |")
        lines += [
            f"| **total** (median of {len(e['seconds_all'])}: "
            f"{' / '.join(f'{x:.2f}' for x in e['seconds_all'])}) | **{e['seconds']:.2f}** | |",
            f"| floor: {e['checkpoints']} x {e['n']} bare passes (median of "
            f"{' / '.join(f'{x:.2f}' for x in e['floor_seconds'])}) | {e['floor']:.2f} | |",
            f"| **explain / floor** | **{e['over_floor']:.2f}x** | |",
            *([f"| floor with whylook's CPU kernels (fused Conv2d -> ReLU, 2x2 pooling; median of "
               f"{' / '.join(f'{x:.2f}' for x in e['fused_floor_seconds'])}) | "
               f"{e['fused_floor']:.2f} | |",
               f"| **explain / fused floor** | **{e['over_fused_floor']:.2f}x** | |"]
              if e.get("fused_floor") else []),
            *([f"| CPU seconds, user + system, of each explain: "
               f"{_cpu_text(e['cpu_seconds']['explain'])}; of each bare floor: "
               f"{_cpu_text(e['cpu_seconds']['floor'])} | | |",
               f"| explain / floor in user CPU time (medians) | "
               f"{e['over_floor_user_cpu']:.2f}x | |"]
              if e.get("cpu_seconds") else []),
            f"| rerun with every shard cached | {e['cached_seconds']:.2f} | |",
            *([f"| explain with the data decoded, not read from the data cache "
               f"(`WHYLOOK_CACHE=off`; its load data "
               f"{e['data_decoded_stages'].get('load data', 0):.2f} s) | "
               f"{e['data_decoded_seconds']:.2f} | |",
               f"| its ratio to the floor | {e['data_decoded_seconds'] / e['floor']:.2f}x | |"]
              if e.get("data_decoded_seconds") else []),
            *([f"| explain in bfloat16 (median of "
               f"{' / '.join(f'{x:.2f}' for x in e['bfloat16']['seconds_all'])}; its saliency "
               f"stage {e['bfloat16']['stages'].get('saliency (Grad-CAM, T+1 passes)', 0):.2f}) | "
               f"{e['bfloat16']['seconds']:.2f} | |",
               f"| floor under bfloat16 autocast (median of "
               f"{' / '.join(f'{x:.2f}' for x in e['bfloat16']['floor_seconds'])}) | "
               f"{e['bfloat16']['floor']:.2f} | |",
               f"| **bfloat16 explain / float32 floor** | "
               f"**{e['bfloat16']['over_float32_floor']:.2f}x** | |",
               f"| **bfloat16 explain / bfloat16 floor** | "
               f"**{e['bfloat16']['over_bfloat16_floor']:.2f}x** | |",
               *([f"| bfloat16 explain / bfloat16 floor with the fused kernels (median of "
                  f"{' / '.join(f'{x:.2f}' for x in e['bfloat16']['fused_floor_seconds'])}) | "
                  f"{e['bfloat16']['over_bfloat16_fused_floor']:.2f}x | |"]
                 if e["bfloat16"].get("over_bfloat16_fused_floor") else [])]
              if e.get("bfloat16") else []),
            "",
            f"Python imports of the analysis modules (not in the total; a CLI call pays them "
            f"once): {e['import_seconds']:.2f} s.",
            "",
        ]
    mem = res.get("memory")
    if mem and mem["runs"]:
        lines += [
            "**Prototype stage memory** (fresh process each; explain on 3 checkpoints with a "
            "small analysis set; growth = peak RSS minus RSS before explain):",
            "",
            "| prototype set | peak RSS growth (MiB) | peak RSS (MiB) | prototype stage (s) |",
            "|---:|---:|---:|---:|",
        ]
        for r in mem["runs"]:
            lines.append(f"| {r['prototype_size']} | {r['growth_mib']:.0f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['prototype_seconds']:.1f} |")
        if mem["growth_ratio"] is not None:
            lines.append("")
            lines.append(f"Growth ratio {mem['growth_ratio']:.2f}x for a "
                         f"{mem['size_ratio']:.0f}x larger prototype set.")
        lines.append("")
    sc = res.get("scaling")
    if sc:
        lines += [
            "**Scaling** (explain, fresh cache each; points run A B C C B A, the faster of "
            "each point's two runs):",
            "",
            "| point | n | T+1 | explain (s) | its saliency stage (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in ("base", "2n", "2T"):
            p = sc["points"][name]
            lines.append(f"| {name} | {p['n']} | {p['checkpoints']} | {p['seconds']:.2f} | "
                         f"{p['saliency_seconds']:.2f} |")
        lines += [
            "",
            f"Exponents (1.0 = linear): explain {sc['exponent_n']:.2f} in n, "
            f"{sc['exponent_T']:.2f} in T+1; saliency stage {sc['saliency_exponent_n']:.2f} "
            f"in n, {sc['saliency_exponent_T']:.2f} in T+1.",
            "",
        ]
    t = res.get("targets")
    if t:
        lines += ["**Targets**:", ""]
        lines += [f"- {k}: {v}" for k, v in t.items()]
        lines.append("")
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> dict[str, str]:
    out = {}
    s, e, mem, sc = (res.get(k) for k in ("saliency", "explain", "memory", "scaling"))
    if s and s["speedup_vs_fastest_rival"] is not None:
        v = s["speedup_vs_fastest_rival"]
        out["saliency >= 1.5x the faster of Captum (logits by a hook) and grad-cam"] = (
            f"{v:.2f}x — {'met' if v >= 1.5 else 'NOT met'}")
        v = s["speedup_vs_fastest_plain_rival"]
        out["saliency >= 1.5x the faster of Captum (2nd pass for softmax) and grad-cam"] = (
            f"{v:.2f}x — {'met' if v >= 1.5 else 'NOT met'}")
    if e:
        v = e["over_floor"]
        note = " (--quick: fixed costs dominate at these sizes)" if res.get("quick") else ""
        out["explain within 1.3x of the floor"] = (
            f"{v:.2f}x — {'met' if v <= 1.3 else 'NOT met'}{note}")
        if e.get("over_fused_floor"):
            v = e["over_fused_floor"]
            out["explain within 1.3x of the floor with whylook's fused kernels"] = (
                f"{v:.2f}x — {'met' if v <= 1.3 else 'NOT met'}{note}")
    if mem and mem["growth_ratio"] is not None:
        v = mem["growth_ratio"]
        verdict = "met" if v <= 1.5 else "NOT met"
        if res.get("quick"):
            # Both quick sizes stay below the fixed K-Means subsample (200,000 vectors), so the
            # subsample itself grows with the set: no test of the flat-memory design.
            verdict = "not a test in --quick (both sets are below the K-Means subsample)"
        out["prototype-stage peak memory grows <= 1.5x for a 6x prototype set"] = (
            f"{v:.2f}x — {verdict}")
    if sc:
        worst = max(sc["exponent_n"], sc["exponent_T"])
        out["time linear in n and T"] = (
            f"exponents {sc['exponent_n']:.2f} (n), {sc['exponent_T']:.2f} (T+1) — "
            f"{'met' if worst <= 1.15 else 'NOT met'} (<= 1.15 counts as linear)")
    return out


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--data", default=None, help="data spec (default: shared MNIST or mnist5k)")
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch and BLAS/OpenMP threads for every contender (default: all "
                         "cores; on a shared machine 1 measures more steadily)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--whylook-layout", choices=("auto", "nhwc", "nchw"), default="auto",
                    help="whylook's memory layout in the saliency section (default: its own "
                         "choice, NHWC on CPU)")
    ap.add_argument("--runs-dir", type=Path,
                    default=Path(os.environ.get("WHYLOOK_BENCH_RUNS",
                                                "/tmp/whylook-bench-runs")))
    ap.add_argument("--only", default="saliency,explain,memory,scaling",
                    help="comma-separated sections to run")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: also measure whylook's precision='bfloat16' (saliency, "
                         "explain) beside everything in float32")
    ap.add_argument("--out", type=Path, default=None, help="JSON result path")
    ap.add_argument("--memory-child", nargs=3, metavar=("RUN", "P", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    # One thread budget for torch and for BLAS/OpenMP (scikit-learn's K-Means, HDBSCAN).
    with threadpool_limits(limits=args.threads):
        if args.memory_child:
            run_path, p, n = args.memory_child
            memory_child(run_path, int(p), int(n), args.device)
            return 0
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    global WHYLOOK_CHANNELS_LAST
    WHYLOOK_CHANNELS_LAST = {"auto": None, "nhwc": True, "nchw": False}[args.whylook_layout]
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    device = torch.device(args.device)
    data = args.data or default_data()
    sections = set(args.only.split(","))
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_analysis.py " + " ".join(sys.argv[1:])
    res: dict[str, Any] = {"command": command.strip(), "data": data, "model": args.model,
                           "whylook_layout": args.whylook_layout, "quick": args.quick,
                           "sizes": sizes.__dict__,
                           "machine": machine_info(args.threads, device)}
    print(json.dumps(res["machine"]), flush=True)
    suffix = f"{args.model}-{device.type}" + ("-quick" if args.quick else "")
    out = args.out or RESULTS / f"analysis-{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> str:
        """Write what is measured so far (a killed run keeps its finished sections)."""
        res["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        res["targets"] = targets(res)
        out.write_text(json.dumps(res, indent=2) + "\n")
        table = render(res)
        out.with_suffix(".md").write_text(table + "\n")
        return table

    run = ensure_run(data, args.model, sizes, args.runs_dir, args.device)
    base = run.path.name
    run_main = subset_run(run, spread(sizes.saliency_checkpoints, len(run.checkpoints)),
                          args.runs_dir / f"{base}-sub{sizes.saliency_checkpoints}")
    models = (load_models(run_main, device)  # loaded once, shared by both sections
              if sections & {"saliency", "explain"} else [])
    if "saliency" in sections:
        print("saliency stage ...", flush=True)
        res["saliency"] = bench_saliency(run_main, models, sizes, device, args.batch_size,
                                         args.precision)
        save()
    nhwc = res.get("saliency", {}).get("floor", "floor (NHWC)") == "floor (NHWC)"
    if "explain" in sections:
        print("explain ...", flush=True)
        res["explain"] = bench_explain(run_main, models, sizes.explain_n, device,
                                       args.batch_size, nhwc, sizes.repeats, args.precision)
        save()
    del models
    if "scaling" in sections:
        print("scaling ...", flush=True)
        double = subset_run(run, spread(2 * sizes.saliency_checkpoints, len(run.checkpoints)),
                            args.runs_dir / f"{base}-sub{2 * sizes.saliency_checkpoints}")
        res["scaling"] = bench_scaling(double, run_main, sizes, device)
        save()
    if "memory" in sections:
        print("prototype-stage memory ...", flush=True)
        res["memory"] = bench_memory(run, sizes, args.threads, device, args.runs_dir)
    table = save()
    print()
    print(table)
    print(f"written: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
