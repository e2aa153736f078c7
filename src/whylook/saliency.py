"""Step 2: raw Grad-CAM on the true-class logit, plus softmax confidences.

For every sample ``i`` and checkpoint ``t`` this computes

    I_i = ReLU(sum_c alpha_c A_c),   alpha_c = mean_{h,w} d logit_{y_i} / d A_c

at the prototype layer ``L`` (output ``A`` of shape ``(B, d, h, w)``), on ``L``'s own
``h x w`` grid and without any per-image rescaling, so intensities stay comparable across
checkpoints and line up with the prototype assignments exactly (docs/METHOD-NOTES.md, Step 2).

Speed comes from doing only the work Grad-CAM needs:

* parameters are frozen for the duration (``requires_grad_(False)``) and the hook turns
  ``L``'s output into a fresh leaf tensor, so autograd records nothing before ``L`` and
  computes no parameter gradient at all;
* one backward pass per batch, on the *sum* of the selected logits: in eval mode samples
  are independent, so the gradient of the sum w.r.t. sample ``i``'s activations is the
  gradient of sample ``i``'s own logit;
* ``torch.autograd.grad`` w.r.t. that leaf only, in large batches;
* on CPU, the NHWC layout, and before the layer oneDNN's own kernels
  (``whylook/_fusion.py``): runs of ``Conv2d``/``ReLU``/``MaxPool2d`` in ``nn.Sequential``
  containers on oneDNN's blocked tensors (its direct convolution and pooling, no tensor
  of the ReLU's own), or else each ``Conv2d -> ReLU`` pair as one kernel; and 2x2
  max-pooling before the layer without the indices torch computes for a backward that
  never comes (``whylook/_pooling.py``; in NCHW, where a model that fails in NHWC runs,
  10x faster).

``precision="bfloat16"`` (opt-in) runs the pass under ``torch.autocast`` in bfloat16, as
torch's mixed precision does: the activations ``A``, the logits and their gradient
w.r.t. ``A`` are bfloat16 results (about 3 significant digits), handed over as float32;
alpha, the CAM and the softmax are float32 computations on them. (Keeping the network
after the layer in float32 measured no closer to float32's explanation and, on ResNet-18
at ``layer3``, took explain from 18 s to 31 s: ``benchmarks/RESULTS.md``.) On CPUs with
AMX units the pass is 2-3x faster; with AVX-512 BF16 alone about as fast as float32, and
without bfloat16 instructions several times slower, which a one-time warning says. GPUs
with bfloat16 are not measured yet.

Sharding: results are per sample, so a checkpoint's saliency can be computed over slices
of the samples and joined with :meth:`SaliencyResult.concat`.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import warnings
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from whylook._checks import is_whole
from whylook._fusion import eager_layout, fused_conv_relu
from whylook._pooling import fast_max_pool
from whylook._progress import progress_bar
from whylook.errors import WhylookError
from whylook.models import resolve_device

__all__ = [
    "PRECISIONS",
    "GradCAM",
    "SaliencyResult",
    "grad_cam",
    "layer_features",
    "layer_output_shape",
    "resolve_layer",
]

ImageArray = np.ndarray | torch.Tensor
LabelArray = np.ndarray | torch.Tensor | Sequence[int]

#: The arithmetic of the forward pass before the prototype layer (see the module docstring).
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True, eq=False)
class SaliencyResult:
    """Grad-CAM output of one checkpoint over a set (or shard) of samples.

    Attributes:
        saliency: ``float32 (n, h, w)``, raw Grad-CAM on the true-class logit.
        confidence: ``float32 (n, M)``, softmax of the logits.
        features: ``float32 (n, d, h, w)``, the layer's activations, or ``None`` unless
            they were asked for.
    """

    saliency: np.ndarray
    confidence: np.ndarray
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.saliency.shape[0])

    @classmethod
    def concat(cls, parts: Sequence[SaliencyResult]) -> SaliencyResult:
        """Join the results of consecutive sample shards of the same checkpoint.

        >>> import numpy as np
        >>> a = SaliencyResult(np.zeros((2, 2, 2), np.float32), np.ones((2, 3), np.float32))
        >>> len(SaliencyResult.concat([a, a]))
        4
        """
        if not parts:
            raise WhylookError("SaliencyResult.concat needs at least one result")
        with_features = [p.features is not None for p in parts]
        if any(with_features) and not all(with_features):
            raise WhylookError(
                "cannot concatenate saliency shards with and without features; compute all "
                "shards with the same return_features"
            )
        try:
            return cls(
                saliency=np.concatenate([p.saliency for p in parts]),
                confidence=np.concatenate([p.confidence for p in parts]),
                features=(
                    np.concatenate([p.features for p in parts])
                    if all(with_features)
                    else None
                ),
            )
        except ValueError as exc:
            raise WhylookError(
                f"saliency shards do not fit together ({exc}); compute them with the same "
                "model and layer"
            ) from None


# --------------------------------------------------------------------------- inputs


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` for a layer given as a module or a ``named_modules`` path.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> resolve_layer(net, "0")[0]
    '0'
    """
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer in modules and layer != "":
            return layer, modules[layer]
        near = [n for n in modules if n and (layer in n or n in layer)][:5]
        hint = f" (close matches: {', '.join(near)})" if near else ""
        raise WhylookError(
            f"layer {layer!r} is not a module of the model{hint}; pass a name from "
            "model.named_modules()"
        )
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer and name:
                return name, module
        raise WhylookError(
            "the given layer module is not part of the model; pass a submodule of the model "
            "or its name from model.named_modules()"
        )
    raise WhylookError(f"layer must be a module or a module name, not {type(layer).__name__}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    if any(nn.parameter.is_lazy(p) for p in model.parameters()):
        # Most tensor methods raise on a lazy module's weights before its first forward.
        raise WhylookError(
            "the model has weights whose shapes are not known yet (a Lazy module, e.g. "
            "nn.LazyLinear); run it once on a batch of your images first"
        )
    for p in model.parameters():
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return p.device, dtype
    return torch.device("cpu"), torch.float32


def _check_images(images: ImageArray) -> ImageArray:
    if not isinstance(images, np.ndarray | torch.Tensor):
        raise WhylookError(
            f"images must be a numpy array or torch tensor (N, C, H, W), not "
            f"{type(images).__name__}"
        )
    if images.ndim != 4:
        raise WhylookError(
            f"images must have shape (N, C, H, W), got {tuple(images.shape)}; add the channel "
            "axis (e.g. images[:, None]) for grayscale"
        )
    _check_pixel_dtype(images)
    if images.shape[0] == 0:
        raise WhylookError("images is empty (0 samples); pass at least one image")
    return images


def _check_pixel_dtype(images: ImageArray) -> None:
    # Only uint8 is scaled by 1/255 on the way in (_batch_to_device): 0-255 pixel values in
    # a wider integer type would reach the model unscaled, a silently wrong answer.
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8 or images.dtype.kind == "f":
            return
        name = str(images.dtype)
        to_uint8, to_float = "images.astype(np.uint8)", "images.astype(np.float32)"
    else:
        if images.dtype == torch.uint8 or images.dtype.is_floating_point:
            return
        name = str(images.dtype).removeprefix("torch.")
        to_uint8, to_float = "images.to(torch.uint8)", "images.float()"
    # Only 0-255 values fit uint8; a wider range (16-bit images) must be scaled to [0, 1].
    example = (to_float if name == "bool"
               else f"{to_uint8} for 0-255 values, or float images divided by their maximum")
    raise WhylookError(f"images are {name}; pass uint8 (0-255) or float in [0, 1], e.g. {example}")


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` that also accepts read-only arrays (e.g. ``np.load(mmap_mode="r")``).

    whylook only ever reads these tensors, so torch's warning about non-writable arrays
    does not apply.
    """
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


RowArray = np.ndarray | Sequence[int]


def _check_rows(rows: RowArray | None, images: ImageArray) -> np.ndarray | None:
    """``rows`` as int64 indices into ``images`` (``None`` stays ``None``: all images)."""
    if rows is None:
        return None
    arr = np.asarray(rows)
    n = int(images.shape[0])
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise WhylookError(f"rows must be a 1-D sequence of image indices, got {arr.dtype} "
                           f"{arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n):
        raise WhylookError(f"rows must lie in [0, {n - 1}] for {n} images")
    return arr


def _batch_to_device(
    images: ImageArray,
    lo: int,
    hi: int,
    device: torch.device,
    dtype: torch.dtype,
    rows: np.ndarray | None = None,
) -> torch.Tensor:
    """Slice (or, with ``rows``, gather) a batch and make it float in [0, 1] on the device.

    uint8 batches travel as uint8 (4x less to copy) and are scaled on the device. Gathering
    per batch means a subset of a large array is never copied whole.
    """
    if rows is None:
        batch = images[lo:hi]
    elif isinstance(images, np.ndarray):
        batch = images[rows[lo:hi]]
    else:
        batch = images[torch.from_numpy(rows[lo:hi]).to(images.device)]
    if isinstance(batch, np.ndarray):
        batch = from_numpy(np.ascontiguousarray(batch))
    batch = batch.detach().to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        return batch.to(dtype).div_(255.0)
    return batch.to(dtype)


def _one_channel_nhwc(x: torch.Tensor) -> torch.Tensor:
    """A dense one-channel batch with NHWC strides ``(H*W, 1, W, 1)``: the same memory.

    With one channel both layouts' strides address the same bytes, and torch reads the
    default ones (``(H*W, H*W, W, 1)``) as NCHW: oneDNN's first convolution then writes its
    output in NCHW, and the pooling and a layout copy after it ran in NCHW too. On
    ``smallcnn`` (MNIST) that made the passes 1.26x slower than with NHWC strides
    (benchmarks/RESULTS.md, "One-channel batches in NHWC strides"), and which one a batch had
    depended on how the caller's image array was laid out.
    """
    if x.ndim != 4 or x.shape[1] != 1 or not x.is_contiguous():
        return x
    h, w = x.shape[2], x.shape[3]
    return x.as_strided(x.shape, (h * w, 1, w, 1), x.storage_offset())


def _check_labels(labels: LabelArray, n: int) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        y = labels.detach().cpu()
    else:
        arr = np.asarray(labels)
        if arr.dtype.kind not in "iu":
            raise WhylookError(f"labels must be integers, not {arr.dtype}")
        y = from_numpy(arr.astype(np.int64, copy=False))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise WhylookError(f"labels must be integers, not {y.dtype}")
    if y.shape != (n,):
        raise WhylookError(
            f"labels must have shape ({n},) to match the images, got {tuple(y.shape)}"
        )
    y = y.to(torch.int64)
    if n and int(y.min()) < 0:
        raise WhylookError("labels must be class indices >= 0")
    return y


# --------------------------------------------------------------------------- hooks


# Words of torch's messages for input the model cannot take (channels, sizes, shapes).
_SHAPE_WORDS = re.compile(r"channels|shape|size|mat1 and mat2|dimension")


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the hook to end a forward pass as soon as the layer has run."""


class _LayerOutputError(Exception):
    """The layer's output is unusable; turned into a WhylookError outside the forward."""

    def __init__(self, shape: tuple[int, ...] | None, reason: str) -> None:
        super().__init__(reason)
        self.shape = shape
        self.reason = reason


def _aliases_input(out: torch.Tensor, inputs: Any) -> bool:
    """Whether ``out`` shares memory with a tensor among the layer's positional inputs."""
    try:
        ptr = out.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without plain storage
        return False
    for t in inputs if isinstance(inputs, tuple) else (inputs,):
        if isinstance(t, torch.Tensor) and t.device == out.device:
            try:
                if t.untyped_storage().data_ptr() == ptr:
                    return True
            except (RuntimeError, NotImplementedError):
                continue
    return False


def _check_layer_output(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise _LayerOutputError(None, f"returns {type(out).__name__}, not a tensor")
    if out.ndim != 4:
        raise _LayerOutputError(tuple(out.shape), f"returns shape {tuple(out.shape)}, not 4-D")
    if out.shape[2] * out.shape[3] < 4:
        raise _LayerOutputError(
            tuple(out.shape), f"has a {out.shape[2]}x{out.shape[3]} map, smaller than 2x2"
        )
    return out


def _spatial_candidates(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Names of layers with a (B, d, h, w) output and h*w >= 4, the usable ones first.

    Only runs on the error path; it costs one forward pass of one sample.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def record(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] >= 4:
                shapes.setdefault(name, tuple(out.shape[1:]))

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad(), contextlib.suppress(Exception):
            model(sample)
    finally:
        for h in handles:
            h.remove()
    if not shapes:
        return []
    # The shallowest names (``layer3`` rather than ``layer3.1.bn2``) that run last are the
    # ones a user most likely wants: the deepest spatial stage.
    depth = min(n.count(".") for n in shapes)
    top = [n for n in shapes if n.count(".") == depth][-3:]
    return [f"{n} ({'x'.join(map(str, shapes[n]))})" for n in reversed(top)]


#: Models that failed in NHWC (a ``.view`` after a convolution): later sessions on the same
#: object (explain loads every checkpoint into one) start in NCHW instead of running their
#: first batch twice. Weak, so whylook keeps no model alive.
_NCHW_ONLY: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _use_channels_last(model: nn.Module, channels_last: bool | None) -> bool:
    """Resolve ``channels_last=None`` ("auto"): on for CPU models with a 2-D convolution,
    unless this model object already failed in NHWC.

    On CPU (oneDNN) the NHWC layout is much faster for the ops around the convolutions:
    measured on the 2-core benchmark machine, a 2x2 max-pool of a (256, 16, 28, 28) batch
    took 14 ms in NHWC against 95 ms in NCHW, and smallcnn's whole Grad-CAM pass ran ~1.7x
    faster (benchmarks/RESULTS.md). On GPUs it is left off until measured there.
    """
    if channels_last is not None:
        return bool(channels_last)
    if model in _NCHW_ONLY:
        return False
    device, _ = _model_device_dtype(model)
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _use_fusion(fuse: bool | None) -> bool:
    """Resolve ``fuse``: ``False`` is off; ``None`` or ``True``, on where each kernel applies
    (``whylook/_fusion.py``: a float32 CPU model with oneDNN, in either precision;
    ``whylook/_pooling.py``: a CPU model)."""
    if fuse is not None and not isinstance(fuse, bool):
        raise WhylookError(f"fuse must be True, False or None, not {fuse!r}")
    return fuse is not False


def check_precision_name(precision: object) -> None:
    """Refuse a precision that is not one of :data:`PRECISIONS`, in one line."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise WhylookError(
            f"precision must be one of {', '.join(map(repr, PRECISIONS))}, not {precision!r}"
        )


def precision_key(precision: str) -> dict[str, str]:
    """What a cache key holds of the precision: nothing for float32, so that keys made
    before the setting existed stay valid."""
    return {} if precision == "float32" else {"precision": precision}


def _check_precision(precision: object, model: nn.Module) -> torch.dtype | None:
    """The autocast dtype of the passes (``None``: none, the model's own dtype)."""
    check_precision_name(precision)
    if precision == "float32":
        return None
    device, dtype = _model_device_dtype(model)
    if dtype != torch.float32:
        # Autocast casts float32 operations only: a float64 model would run in float64.
        raise WhylookError(
            f"precision {precision!r} applies to float32 models, and this one is "
            f"{str(dtype).removeprefix('torch.')}; convert it with model.float() or use "
            "precision 'float32'"
        )
    if not torch.amp.is_autocast_available(device.type):
        raise WhylookError(
            f"precision {precision!r} needs torch.autocast, which this torch lacks on "
            f"{device.type}; use precision 'float32'"
        )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise WhylookError(
            f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 arithmetic; "
            "use precision 'float32'"
        )
    if device.type == "cpu":
        slow = _slow_bfloat16_cpu()
        if slow and slow not in _WARNED:
            # Once per process: an explain makes a pass per checkpoint.
            _WARNED.add(slow)
            warnings.warn(slow, UserWarning, stacklevel=3)
    return torch.bfloat16


_WARNED: set[str] = set()


def _slow_bfloat16_cpu() -> str | None:
    """Why bfloat16 will not pay on this CPU, or ``None`` where it does (AMX). Measured on
    smallcnn's Grad-CAM pass with oneDNN limited to each instruction set: with AMX 2.7-2.9x
    faster than float32, with AVX-512 BF16 alone the same speed, with AVX-512 but no
    bfloat16 instructions 2.2x slower, with AVX2 7x slower (bench_bfloat16_isa.py)."""
    probe = getattr(torch, "cpu", None)
    try:
        amx = bool(probe._is_amx_tile_supported())  # type: ignore[union-attr]
        bf16 = bool(probe._is_avx512_bf16_supported())  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None  # no probe in this torch: nothing to say
    if amx:
        return None
    if bf16:
        return ("this CPU has AVX-512 BF16 but no AMX units: precision 'bfloat16' runs at "
                "about float32's speed here and only rounds the activations; use 'float32'")
    return ("this CPU has no bfloat16 instructions (AMX or AVX-512 BF16): precision "
            "'bfloat16' is emulated and runs several times slower than float32; use 'float32'")


class _LayerSession:
    """Context manager that puts the model in analysis state and always restores it.

    On entry: eval mode for every module, parameters frozen (when ``freeze``), a forward
    hook on the layer, and (``channels_last``) 4-D weights in the NHWC layout. On exit
    (also on error): the hook is removed and every module's train/eval flag, every
    parameter's ``requires_grad`` and the weights' layout are put back as they were.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | str,
        *,
        freeze: bool,
        channels_last: bool = False,
        fuse: bool = False,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.name, self.layer = resolve_layer(model, layer)
        self.freeze = freeze
        self.channels_last = channels_last
        self.fuse = fuse
        self.autocast = autocast
        self.device, self.dtype = _model_device_dtype(model)
        self._fusion: contextlib.ExitStack | None = None
        self._converted = False
        self.mode: str = "grad"  # "grad": make a leaf; "features": stop after the layer
        self.activation: torch.Tensor | None = None
        self.calls = 0
        self._running = False
        self._handle: Any = None
        self._recording: torch.Tensor | None = None
        #: The layout eager torch gives the layer's output, where A is held in another.
        self.layout: torch.memory_format | None = None
        self._layout_seen = False
        self._saved_layout: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._saved_buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        self._saved_grad: list[tuple[nn.Parameter, bool]] = []

    def _hook(self, module: nn.Module, inputs: Any, out: Any) -> Any:
        # Where the layer's blocked run handed its output over in NCHW, eager torch gives
        # it in NHWC: what runs after the layer gets it so (whylook/_fusion.py).
        layout = eager_layout(module, out) if isinstance(out, torch.Tensor) else None
        if not self._running:
            # A forward the caller runs inside the ``with`` block, or another session's on
            # the same model (nested cams): its output is none of this session's business.
            return None if layout is None else out.clone(memory_format=layout)
        self.calls += 1
        if self.calls > 1:
            raise _LayerOutputError(None, "runs more than once per forward pass")
        out = _check_layer_output(out)
        if self.mode == "grad" and _aliases_input(out, inputs):
            # The output is (a view of) the layer's input: an in-place layer such as
            # ReLU(inplace=True), or Identity. The model may read that tensor elsewhere too
            # (a skip connection), and a copy would leave those reads out of the gradient;
            # recording on the tensor itself counts every read, as Captum does.
            if not out.requires_grad:
                out.requires_grad_(True)
            self.activation = out
            self._recording = out
            return out.clone()
        if self.autocast is not None:
            # A in the model's dtype (the same values): stored features, and the leaf whose
            # gradient comes back in that dtype through the cast autocast puts after it.
            out = out.to(self.dtype)
        if self.mode == "features":
            self.activation = (out if layout is None
                               else out.contiguous(memory_format=layout)).detach()
            raise _StopForward
        leaf = out.detach().requires_grad_(True)
        self.activation = leaf
        self.layout = layout
        # The network gets a copy: an in-place op after the layer (ReLU(inplace=True),
        # ``out += identity``) would otherwise be refused on a leaf, or change the stored A.
        return leaf.clone(memory_format=layout or torch.preserve_format)

    def __enter__(self) -> _LayerSession:
        self._saved_training = [(m, m.training) for m in self.model.modules()]
        self._saved_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self.model.eval()
            if self.freeze:
                for p in self.model.parameters():
                    p.requires_grad_(False)
            if self.channels_last:
                self._to_channels_last()
            if self.fuse:
                self._fusion = contextlib.ExitStack()
                # The layer may get a blocked input: the hook below, its only one, reads
                # the output alone (_fusion checks at each call that no other came).
                self._fusion.enter_context(fused_conv_relu(
                    self.model, keep=(self.layer,), takes_blocked=(self.layer,)))
            self._handle = self.layer.register_forward_hook(self._hook)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()

    def _to_channels_last(self) -> None:
        # Only a model whose 4-D tensors are all in the default layout is converted; a model
        # the user already laid out otherwise is left alone (its input is still made NHWC in
        # ``forward``). Not ``model.to(memory_format=...)``: that refuses 5-D weights (a
        # Conv3d beside the Conv2d), and puts every tensor in new memory, so a model in
        # shared memory (``share_memory()``) or a buffer two modules share would come back
        # split from it. Each converted tensor's original is kept and put back on exit.
        params = [p for p in self.model.parameters() if p.ndim == 4]
        buffers = [(m, name, b) for m in self.model.modules() for name, b in m._buffers.items()
                   if b is not None and b.ndim == 4]
        if not (params or buffers) or not all(
            t.is_contiguous() for t in itertools.chain(params, (b for _, _, b in buffers))
        ):
            return
        self._converted = True
        for p in params:
            self._saved_layout.append((p, p.data))
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        done: dict[int, torch.Tensor] = {}
        for m, name, b in buffers:
            self._saved_buffers.append((m, name, b))
            if id(b) not in done:
                done[id(b)] = b.contiguous(memory_format=torch.channels_last)
            m._buffers[name] = done[id(b)]

    def _to_default_layout(self) -> None:
        if not self._converted:
            return
        # The originals take the current values first: weights loaded during the session
        # (``load_state_dict`` inside a ``with GradCAM(...)`` block) are kept. Only changed
        # values are written: an original may be read-only or mapped from a file.
        def put_back(now: torch.Tensor | None, original: torch.Tensor) -> bool:
            if now is None or now.shape != original.shape or now.dtype != original.dtype:
                return False  # replaced by something else during the session: keep that
            if now is not original and not torch.equal(now, original):
                original.copy_(now)
            return True

        with torch.no_grad():
            for p, original in self._saved_layout:
                if put_back(p.data, original):
                    p.data = original
            for m, name, original in self._saved_buffers:
                if put_back(m._buffers.get(name), original):
                    m._buffers[name] = original
        self._saved_layout.clear()
        self._saved_buffers.clear()
        self._converted = False

    def _release(self) -> None:
        # The tensor the last pass recorded on (see ``_hook``) stops recording.
        if self._recording is not None and self._recording.is_leaf:
            self._recording.requires_grad_(False)
        self._recording = None

    def _restore(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._fusion is not None:
            self._fusion.close()
            self._fusion = None
        self._release()
        self._to_default_layout()
        for m, training in self._saved_training:
            m.training = training
        for p, requires_grad in self._saved_grad:
            p.requires_grad_(requires_grad)
        self.activation = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run the model; return the logits (``grad`` mode) or ``None`` (``features``)."""
        self.calls = 0
        self.activation = None
        self.layout = None
        self._release()
        x_in = x
        if self.channels_last and x.ndim == 4:
            x_in = x.contiguous(memory_format=torch.channels_last)
            if not self._layout_seen and x_in.data_ptr() == x.data_ptr():
                # Already NHWC as it is (one channel): until a pass has run in NHWC, the
                # model gets a copy, so a retry in NCHW below does not see an input that a
                # forward changing its input in place (``x -= mean``) has already changed.
                x_in = x_in.clone(memory_format=torch.channels_last)
            x_in = _one_channel_nhwc(x_in)
        try:
            # Only around the model's own forward: the pooling mode must not see a caller's
            # code between two batches.
            with (fast_max_pool() if self.fuse and self.device.type == "cpu"
                  else contextlib.nullcontext()), \
                    (torch.autocast(self.device.type, dtype=self.autocast)
                     if self.autocast is not None else contextlib.nullcontext()):
                self._running = True
                try:
                    out = self.model(x_in)
                finally:
                    self._running = False
        except _StopForward:
            self._layout_seen = True
            return None
        except _LayerOutputError as exc:
            raise self._layer_error(exc, x[:1]) from None
        except RuntimeError as exc:
            if not self.channels_last:
                # One line instead of torch's traceback (kept as the cause for debugging).
                text = str(exc).strip()
                first = text.splitlines()[0] if text else type(exc).__name__
                if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in first:
                    hint = "; use a smaller batch size (--batch-size, or batch_size=...)"
                elif _SHAPE_WORDS.search(first):
                    hint = ("; check that the images have the channels and size the model "
                            "was built for")
                elif "leaf Variable that requires grad" in first:
                    hint = (f"; the model changes layer {self.name!r}'s output in place after "
                            "the layer (through another reference to it), so its Grad-CAM is "
                            "not defined: choose another layer")
                else:
                    hint = ""
                raise WhylookError(
                    f"the model failed on input of shape {tuple(x.shape)}: {first}{hint}"
                ) from exc
            # Some models cannot run in NHWC (e.g. ``x.view(B, -1)`` after a convolution
            # needs NCHW strides): fall back to the default layout for the rest of the
            # session. An error that is not about the layout repeats and propagates.
            self.channels_last = False
            self._to_default_layout()
            out = self.forward(x)
            _NCHW_ONLY.add(self.model)  # only once NCHW worked: the error was the layout
            return out
        self._layout_seen = True
        if self.calls == 0:
            raise WhylookError(
                f"layer {self.name!r} did not run in the model's forward pass; choose a layer "
                "on the path from input to logits"
            )
        return out

    def _layer_error(self, exc: _LayerOutputError, sample: torch.Tensor) -> WhylookError:
        # The hook must be off while we look for candidates, or it would fire again.
        if self._handle is not None:
            self._handle.remove()
        try:
            candidates = _spatial_candidates(self.model, sample)
        finally:
            self._handle = self.layer.register_forward_hook(self._hook)
        hint = (
            f"layers that would work: {', '.join(candidates)}"
            if candidates
            else "no layer of this model gives a spatial map of at least 2x2 on this input"
        )
        need = (
            "it must run once per forward pass (a module reused within the model, like a "
            "shared ReLU, has no single output)"
            if exc.shape is None and "more than once" in exc.reason
            else "it must output a (B, d, h, w) feature map with h*w >= 4"
        )
        return WhylookError(f"prototype layer {self.name!r} {exc.reason}; {need} — {hint}")


# --------------------------------------------------------------------------- Grad-CAM


class GradCAM:
    """Raw Grad-CAM of the true-class logit at one layer of one model.

    Use it as a context manager to keep the hook and frozen parameters in place across
    several calls (e.g. many shards); every call outside a ``with`` block sets up and
    tears down on its own. Either way the model's train/eval flags, its parameters'
    ``requires_grad`` and its hooks are restored afterwards, also when an error occurs.

    Inside the block the model stays in eval mode with frozen parameters, and calls of it
    other than the cam's own (yours, or another cam's on the same model) run as usual: the
    hook only acts on the cam's own passes.

    ``device=None`` uses the device the model is on; ``"auto"``, ``"cpu"``, ``"cuda"`` or a
    ``torch.device`` moves the model there (like ``model.to(device)``), and it stays there
    afterwards.

    ``channels_last=None`` runs CPU models with convolutions in the NHWC memory layout,
    which is faster there; ``True``/``False`` force it on or off. The values are the same
    up to float rounding, and afterwards the model holds its own tensors again, in their
    own memory (shared memory stays shared) with their current values. A model that
    cannot run in NHWC (``x.view(B, -1)`` after a convolution) runs its first batch again
    in NCHW, so the model's own hooks see that batch twice; later sessions on the same
    model object start in NCHW.

    A layer whose output is its input (``ReLU(inplace=True)``, ``Identity``) may have that
    tensor read elsewhere too, e.g. by a skip connection: the gradient counts every read.

    ``fuse=None`` (or ``True``) runs each ``Conv2d`` directly followed by a ``ReLU`` in an
    ``nn.Sequential`` (neither with hooks or a ``forward`` of its own) as one oneDNN kernel
    on float32 CPU models, and 2x2 max-pooling
    (``nn.MaxPool2d(2)`` or ``F.max_pool2d(x, 2)``) on CPU without the indices torch's
    pooling computes, wherever no gradient is needed (before the layer); the same values,
    less memory traffic. ``False`` runs the model as it is. The model's modules are put
    back afterwards.

    ``precision="bfloat16"`` runs the pass under ``torch.autocast`` in bfloat16 and the
    CAM and softmax in float32; the default ``"float32"`` is exact. See the module
    docstring.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    >>> with GradCAM(net, "0") as cam:
    ...     res = cam(torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1]))
    >>> res.saliency.shape, res.confidence.shape
    ((5, 8, 8), (5, 3))
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | str,
        *,
        device: str | torch.device | None = None,
        channels_last: bool | None = None,
        fuse: bool | None = None,
        precision: str = "float32",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise WhylookError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if device is not None:
            model.to(resolve_device(device))
        self.device, self.dtype = _model_device_dtype(model)
        autocast = _check_precision(precision, model)
        if any(p.is_inference() for p in model.parameters()):
            raise WhylookError(
                "the model's weights were made under torch.inference_mode(), and Grad-CAM's "
                "backward pass cannot go through them; build or load the model outside it"
            )
        self.model = model
        self._session = _LayerSession(
            model, layer, freeze=True, channels_last=_use_channels_last(model, channels_last),
            fuse=_use_fusion(fuse), autocast=autocast,
        )
        self.precision = precision
        self.layer_name = self._session.name
        self._depth = 0

    def __enter__(self) -> GradCAM:
        if self._depth == 0:
            self._session.__enter__()
        self._depth += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._session.__exit__(exc_type, exc, tb)

    def _batch(
        self, x: torch.Tensor, y: torch.Tensor, return_features: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        session = self._session
        session.mode = "grad"
        # inference_mode/no_grad set by a caller would silently disable the backward.
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under a caller's inference_mode cannot take part in a backward
            # (the labels are saved by gather); a copy made here is an ordinary tensor.
            x = x.clone() if x.is_inference() else x
            y = y.clone() if y.is_inference() else y
            logits = session.forward(x)
            acts = session.activation
            assert logits is not None
            assert acts is not None
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                got = (tuple(logits.shape) if isinstance(logits, torch.Tensor)
                       else f"a {type(logits).__name__}")
                raise WhylookError(
                    f"the model must return logits of shape (B, M), got {got}; wrap a model "
                    "that returns more in a module whose forward returns only the logits"
                )
            if not bool(torch.isfinite(logits).all()):
                raise WhylookError(
                    "the model returned NaN or infinite logits; check the images for NaN "
                    "pixels and the weights for a diverged training"
                )
            n_classes = logits.shape[1]
            if int(y.max()) >= n_classes:
                raise WhylookError(
                    f"label {int(y.max())} is out of range for a model with {n_classes} "
                    "outputs; check the labels and the model's number of classes"
                )
            target = logits.gather(1, y[:, None]).sum()
            (grads,) = torch.autograd.grad(target, acts, allow_unused=True)
        if grads is None:
            raise WhylookError(
                f"the logits do not depend on layer {self.layer_name!r}; choose a layer on the "
                "path from input to logits"
            )
        # In the model's dtype: under autocast an in-place layer's A is autocast's (_hook).
        alpha = grads.to(session.dtype).mean(dim=(2, 3))
        acts = acts.detach().to(session.dtype)
        cam = torch.relu(torch.einsum("bc,bchw->bhw", alpha, acts))
        conf = torch.softmax(logits.detach().float(), dim=1)
        feats = None
        if return_features:
            feats = acts.float()
            if session.layout is not None:
                # Features as eager gives them (NHWC), which the prototype stage reads
                # position by position without a copy.
                feats = feats.contiguous(memory_format=session.layout)
        return cam.float(), conf, feats

    def batches(
        self,
        images: ImageArray,
        labels: LabelArray,
        *,
        batch_size: int = 256,
        return_features: bool = False,
        progress: bool | None = None,
        rows: RowArray | None = None,
    ) -> Iterator[SaliencyResult]:
        """Yield one :class:`SaliencyResult` per batch, e.g. to stream features into
        :class:`whylook.prototypes.PrototypeFinder` without holding them all.

        ``rows`` (optional) selects and orders the images to use; ``labels`` then has one
        entry per row. Each batch is gathered on its own, so the subset is never copied.
        """
        for cam, conf, feats in self._batches(images, labels, batch_size, return_features,
                                              progress, rows):
            yield SaliencyResult(
                cam.cpu().numpy(),
                conf.cpu().numpy(),
                None if feats is None else feats.cpu().numpy(),
            )

    def batches_with_features(
        self,
        images: ImageArray,
        labels: LabelArray,
        *,
        batch_size: int = 256,
        progress: bool | None = None,
        rows: RowArray | None = None,
    ) -> Iterator[tuple[SaliencyResult, torch.Tensor]]:
        """Like :meth:`batches`, with the layer's activations ``(B, d, h, w)`` as a tensor
        left on the model's device: statistics and prototype assignments over them then
        run there too, without a copy to the host.

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> [(len(r), tuple(f.shape)) for r, f in GradCAM(net, "1").batches_with_features(
        ...     torch.rand(5, 1, 8, 8), [0, 1, 2, 0, 1], batch_size=3)]
        [(3, (3, 4, 8, 8)), (2, (2, 4, 8, 8))]
        """
        for cam, conf, feats in self._batches(images, labels, batch_size, True, progress, rows):
            assert feats is not None
            yield SaliencyResult(cam.cpu().numpy(), conf.cpu().numpy()), feats

    def _batches(
        self,
        images: ImageArray,
        labels: LabelArray,
        batch_size: int,
        return_features: bool,
        progress: bool | None,
        rows: RowArray | None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        images = _check_images(images)
        index = _check_rows(rows, images)
        n = int(images.shape[0]) if index is None else int(index.size)
        y_all = _check_labels(labels, n)
        _check_batch_size(batch_size)
        with self:
            starts = range(0, n, batch_size)
            for lo in progress_bar(starts, desc="grad-cam", total=len(starts), progress=progress):
                hi = min(lo + batch_size, n)
                x = _batch_to_device(images, lo, hi, self.device, self.dtype, index)
                y = y_all[lo:hi].to(self.device)
                yield self._batch(x, y, return_features)

    def __call__(
        self,
        images: ImageArray,
        labels: LabelArray,
        *,
        batch_size: int = 256,
        return_features: bool = False,
        progress: bool | None = None,
        rows: RowArray | None = None,
    ) -> SaliencyResult:
        """Grad-CAM and confidences for all ``images`` (or ``rows``); see :func:`grad_cam`."""
        parts = list(
            self.batches(
                images,
                labels,
                batch_size=batch_size,
                return_features=return_features,
                progress=progress,
                rows=rows,
            )
        )
        if not parts:
            raise WhylookError("no images given; pass at least one image")
        return SaliencyResult.concat(parts)


def _check_batch_size(batch_size: int) -> None:
    if not is_whole(batch_size) or batch_size < 1:
        raise WhylookError(f"batch_size must be a positive integer, not {batch_size!r}")


def grad_cam(
    model: nn.Module,
    layer: nn.Module | str,
    images: ImageArray,
    labels: LabelArray,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    return_features: bool = False,
    progress: bool | None = None,
    channels_last: bool | None = None,
    rows: RowArray | None = None,
    fuse: bool | None = None,
    precision: str = "float32",
) -> SaliencyResult:
    """Raw Grad-CAM on the true-class logit at ``layer``, and softmax confidences.

    Args:
        model: maps float32 ``(B, C, H, W)`` in [0, 1] to logits ``(B, M)``.
        layer: the prototype layer, a submodule or its ``named_modules()`` name; its output
            must be ``(B, d, h, w)`` with ``h*w >= 4``.
        images: ``(N, C, H, W)``, uint8 (scaled by 1/255) or float in [0, 1].
        labels: ``(N,)`` true classes (one per row when ``rows`` is given); Grad-CAM
            targets these logits.
        batch_size: samples per forward/backward pass; larger is faster.
        device: where to run: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``;
            ``None`` uses the model's device (see :class:`GradCAM`).
        return_features: also return the layer's activations ``(N, d, h, w)``.
        channels_last: memory layout of the pass (see :class:`GradCAM`); ``None`` = auto.
        rows: optional indices of the images to use, in order; each batch is gathered on
            its own, so a subset of a large array is never copied whole.
        fuse: ``Conv2d -> ReLU`` as one kernel, and 2x2 max-pooling without indices, on
            CPU (see :class:`GradCAM`); ``None`` = auto.
        precision: ``"float32"`` (exact) or ``"bfloat16"``: the pass under bfloat16
            autocast, the CAM and softmax in float32 (faster where the hardware has
            bfloat16 units).

    Returns:
        :class:`SaliencyResult` with ``saliency`` (N, h, w), ``confidence`` (N, M) and
        optionally ``features``.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    >>> images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).numpy()
    >>> res = grad_cam(net, "1", images, [3, 1, 4, 1])
    >>> res.saliency.shape, res.saliency.dtype.name
    ((4, 7, 7), 'float32')
    """
    cam = GradCAM(model, layer, device=device, channels_last=channels_last, fuse=fuse,
                  precision=precision)
    return cam(
        images,
        labels,
        batch_size=batch_size,
        return_features=return_features,
        progress=progress,
        rows=rows,
    )


# --------------------------------------------------------------------------- features only


def layer_features(
    model: nn.Module,
    layer: nn.Module | str,
    images: ImageArray,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    channels_last: bool | None = None,
    rows: RowArray | None = None,
    fuse: bool | None = None,
    precision: str = "float32",
) -> Generator[torch.Tensor, None, None]:
    """Yield the layer's activations ``(B, d, h, w)`` batch by batch, on the model's device.

    Forward only, and each pass stops as soon as the layer has run, so nothing after it
    is computed. Meant for fitting prototypes over a large set without holding all
    features (feed each batch to ``PrototypeFinder.partial_fit``). The model is in eval
    mode while the generator runs, and is restored when it finishes or is closed.
    ``rows`` (optional) selects the images, gathered batch by batch, and ``channels_last``,
    ``fuse`` and ``precision`` choose how the pass runs (see :func:`grad_cam`); the
    activations come in the model's dtype either way.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    >>> [tuple(f.shape) for f in layer_features(net, "0", torch.rand(5, 1, 8, 8), batch_size=3)]
    [(3, 4, 6, 6), (2, 4, 6, 6)]
    """
    images = _check_images(images)
    _check_batch_size(batch_size)
    if device is not None:
        model.to(resolve_device(device))
    dev, dtype = _model_device_dtype(model)
    autocast = _check_precision(precision, model)
    index = _check_rows(rows, images)
    n = int(images.shape[0]) if index is None else int(index.size)
    with _LayerSession(
        model, layer, freeze=False, channels_last=_use_channels_last(model, channels_last),
        fuse=_use_fusion(fuse), autocast=autocast,
    ) as session, torch.no_grad():
        session.mode = "features"
        starts = range(0, n, batch_size)
        for lo in progress_bar(starts, desc="features", total=len(starts), progress=progress):
            x = _batch_to_device(images, lo, min(lo + batch_size, n), dev, dtype, index)
            session.forward(x)
            if session.activation is None:
                raise WhylookError(
                    f"layer {session.name!r} did not run in the model's forward pass; choose a "
                    "layer on the path from input to logits"
                )
            yield session.activation


def layer_output_shape(
    model: nn.Module, layer: nn.Module | str, input_shape: Sequence[int]
) -> tuple[int, int, int]:
    """``(d, h, w)`` of the layer's output for one input of shape ``(C, H, W)``.

    >>> from torch import nn
    >>> layer_output_shape(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2)), "0", (3, 32, 32))
    (8, 15, 15)
    """
    if len(input_shape) != 3:
        raise WhylookError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    dev, dtype = _model_device_dtype(model)
    x = torch.zeros((1, *input_shape), dtype=dtype, device=dev)
    with contextlib.closing(layer_features(model, layer, x, batch_size=1)) as batches:
        feats = next(batches)
    d, h, w = feats.shape[1:]
    return int(d), int(h), int(w)
