"""Models and their prototype layers.

Built-in models (``MODEL_NAMES``), all built from scratch (no downloads):

- ``smallcnn``: the fast default. ``block1`` conv16+pool, ``block2`` conv32-conv64+pool,
  ``block3`` conv64 (+ReLU, the prototype layer: 7x7 on 28 px, 8x8 on 32 px), then a
  max-pool, fc128 and the classifier. About 35 s per full-MNIST epoch on 2 CPU cores.
- ``resnet18``, ``resnet50``: torchvision's ResNets. Below 112 px they get a CIFAR-style
  stem (3x3 stride-1 conv, no max-pool), so 28 px input keeps a 7x7 map at ``layer3``.
  The default prototype layer is the deepest stage whose map is at least 7x7.
- ``inception_v3``: torchvision's InceptionV3 (``aux_logits`` off). It needs at least 75
  px, so the model resizes every input to 299x299 (bilinear) inside ``forward``, as the
  architecture was designed; the prototype layer ``Mixed_7c`` is then 8x8.

Built-in models take float input in [0, 1] and normalise it with a :class:`Normalize`
module whose mean/std are buffers, so a checkpoint is self-contained. A user model is
named ``package.module:factory``; ``factory(num_classes=..., in_channels=...,
image_size=...)`` returns an ``nn.Module`` with float32 weights that takes [0, 1] input,
returns ``(batch, num_classes)`` logits and may set the attribute ``whylook_layer`` (its
default prototype layer); :func:`check_model` refuses one that does not.

>>> m = build_model("smallcnn", num_classes=10, in_channels=1, image_size=28)
>>> default_layer(m), layer_shape(m, default_layer(m), (1, 28, 28))
('block3', (64, 7, 7))
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from whylook.errors import WhylookError, option

__all__ = [
    "INCEPTION_INPUT",
    "MODEL_NAMES",
    "Normalize",
    "build_model",
    "check_model",
    "check_trainable",
    "default_layer",
    "get_layer",
    "layer_shape",
    "model_spec",
    "resolve_device",
    "rng_kept",
]

MODEL_NAMES: tuple[str, ...] = ("smallcnn", "resnet18", "resnet50", "inception_v3")
#: InceptionV3 resizes its input to this size (it needs >= 75 px; 299 is its design size).
INCEPTION_INPUT = 299
_MIN_PROTOTYPE_SIDE = 7  # the default layer is the deepest one with a map at least this big
_CIFAR_STEM_BELOW = 112  # ResNets get a 3x3 stride-1 stem below this image side


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std stored as buffers (so in checkpoints)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Sequential):
    """The fast default model (see the module docstring).

    An ``nn.Sequential`` (normalize, block1, block2, block3, pool, classifier): its forward
    is its blocks in order, which lets whylook's CPU passes hand each block's output to the
    next in oneDNN's blocked layout (whylook/_fusion.py).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        h, w = image_size
        if min(h, w) < 8:
            raise WhylookError(f"smallcnn needs images of at least 8x8 pixels, not {w}x{h}")
        self.normalize = Normalize(mean, std)
        self.block1 = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, 16, 3, padding=1),
                relu=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
        )
        self.block2 = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(16, 32, 3, padding=1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(32, 64, 3, padding=1),
                relu2=nn.ReLU(),
                pool=nn.MaxPool2d(2),
            )
        )
        # The prototype layer: its own module, output taken after the ReLU (not in-place, so
        # hooks see the activation Grad-CAM needs).
        self.block3 = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(64, 64, 3, padding=1),
                relu=nn.ReLU(),
            )
        )
        # Pool to at most 4x4 so the classifier stays small for large images.
        out = (max(1, min(h // 8, 4)), max(1, min(w // 8, 4)))
        self.pool = nn.AdaptiveMaxPool2d(out)
        self.classifier = nn.Sequential(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(64 * out[0] * out[1], 128),
                relu=nn.ReLU(),
                fc2=nn.Linear(128, num_classes),
            )
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init (as torchvision's ResNets): on mnist5k it reaches ~2 points more
                # test accuracy in 3 epochs than torch's default conv init.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.whylook_layer = "block3"


# torchvision is imported on first use only (it takes seconds); the classes are cached so
# every build returns the same type.
@functools.cache
def _resnet_class() -> type[nn.Module]:
    from torchvision.models.resnet import ResNet

    class WhylookResNet(ResNet):
        """torchvision's ResNet with input normalisation in front (layer names unchanged)."""

        def __init__(
            self,
            block: type[nn.Module],
            layers: list[int],
            num_classes: int,
            in_channels: int,
            image_size: tuple[int, int],
            mean: Sequence[float],
            std: Sequence[float],
        ) -> None:
            super().__init__(block, layers, num_classes=num_classes)
            self.normalize = Normalize(mean, std)
            side = min(image_size)
            if side < _CIFAR_STEM_BELOW:
                self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
                self.maxpool = nn.Identity()
                stem = list(image_size)
            else:
                self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
                stem = [math.ceil(math.ceil(s / 2) / 2) for s in image_size]
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            # Each later stage halves the map (ceil). Pick the deepest one still >= 7x7.
            sizes = [stem]
            for _ in range(3):
                sizes.append([math.ceil(s / 2) for s in sizes[-1]])
            ok = [i for i, s in enumerate(sizes) if min(s) >= _MIN_PROTOTYPE_SIDE]
            self.whylook_layer = f"layer{(ok[-1] if ok else 0) + 1}"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.normalize(x))

    return WhylookResNet


@functools.cache
def _inception_class() -> type[nn.Module]:
    from torchvision.models.inception import BasicConv2d, Inception3

    class WhylookInception3(Inception3):
        """torchvision's InceptionV3 (no aux head) with normalisation and a resize to 299."""

        def __init__(
            self, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]
        ) -> None:
            super().__init__(
                num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=True
            )
            self.normalize = Normalize(mean, std)
            if in_channels != 3:
                self.Conv2d_1a_3x3 = BasicConv2d(in_channels, 32, kernel_size=3, stride=2)
                # The same initialisation torchvision gives every other conv of the model.
                nn.init.trunc_normal_(self.Conv2d_1a_3x3.conv.weight, std=0.1, a=-2, b=2)
            self.whylook_layer = "Mixed_7c"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.normalize(x)
            if x.shape[-2:] != (INCEPTION_INPUT, INCEPTION_INPUT):
                x = F.interpolate(
                    x, size=(INCEPTION_INPUT, INCEPTION_INPUT), mode="bilinear", align_corners=False
                )
            return self._forward(x)[0]

    return WhylookInception3


def model_spec(model: object) -> str:
    """The name a run records for ``model``: a built-in name or ``package.module:factory``
    as given, or that string for a factory function passed itself. A run folder rebuilds
    its model from the name, so the function must be importable by it.

    >>> model_spec("smallcnn"), model_spec(torch.nn.Identity)
    ('smallcnn', 'torch.nn.modules.linear:Identity')
    """
    if isinstance(model, str):
        return model
    if not callable(model):
        raise WhylookError(
            f"model must be a model name (e.g. smallcnn) or a factory, not {type(model).__name__}"
        )
    module = getattr(model, "__module__", None)
    name = getattr(model, "__qualname__", "")
    if module and module != "__main__" and name.isidentifier() and (
        getattr(sys.modules.get(module), name, None) is model
    ):
        return f"{module}:{name}"
    raise WhylookError(
        f"model {getattr(model, '__name__', model)!r:.60} cannot be rebuilt by name later (a run "
        "folder records its model as package.module:factory); define the factory at the top "
        "level of an importable module, not in __main__ or inside a function"
    )


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int | Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a fresh, untrained model (random init from torch's global RNG).

    ``mean``/``std`` (per channel, [0, 1] scale) default to 0.5 each; pass the training
    split's statistics (``DataSource.channel_stats()``). User factories ignore them.

    >>> build_model("resnet18", num_classes=10, in_channels=3, image_size=32).whylook_layer
    'layer3'
    """
    name = model_spec(name)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1 or num_classes < 2 or in_channels < 1:
        raise WhylookError(
            f"cannot build {name!r} for {num_classes} classes, {in_channels} channels, image "
            f"size {image_size}; need >= 2 classes, >= 1 channel and an (H, W) size"
        )
    h, w = int(size[0]), int(size[1])
    mean = tuple(mean) if mean is not None else (0.5,) * in_channels
    std = tuple(std) if std is not None else (0.5,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise WhylookError(f"mean/std need {in_channels} values each, one per channel")
    # Models take float32 images (the project's convention) and checkpoints hold float32
    # weights; a caller's torch.set_default_dtype(torch.float64) must not change that. The
    # default is process-wide, so it is switched only when it is not float32 already.
    previous = torch.get_default_dtype()
    if previous == torch.float32:
        return _construct(name, num_classes, in_channels, (h, w), mean, std)
    torch.set_default_dtype(torch.float32)
    try:
        return _construct(name, num_classes, in_channels, (h, w), mean, std)
    finally:
        torch.set_default_dtype(previous)


def _construct(name: str, num_classes: int, in_channels: int, size: tuple[int, int],
               mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    h, w = size
    if name == "smallcnn":
        return SmallCNN(num_classes, in_channels, (h, w), mean, std)
    if name in {"resnet18", "resnet50"}:
        from torchvision.models.resnet import BasicBlock, Bottleneck

        block, layers = (
            (BasicBlock, [2, 2, 2, 2]) if name == "resnet18" else (Bottleneck, [3, 4, 6, 3])
        )
        return _resnet_class()(block, layers, num_classes, in_channels, (h, w), mean, std)
    if name == "inception_v3":
        return _inception_class()(num_classes, in_channels, mean, std)
    if ":" in name:
        return _build_user_model(name, num_classes, in_channels, (h, w))
    close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise WhylookError(
        f"unknown model {name!r}{hint}; use one of {', '.join(MODEL_NAMES)} or "
        "package.module:factory"
    )


#: Environment variable: the modules (comma-separated; ``*`` for any) whose model factories a
#: run folder may import. The CLI's ``--trust-model-code MODULE`` adds to it.
TRUST_ENV = "WHYLOOK_TRUST_MODEL_CODE"


def _trusted_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip()]


def trust_model_code(modules: Sequence[str]) -> None:
    """Let run folders import these modules' model factories in this process (what the
    CLI's ``--trust-model-code`` does)."""
    os.environ[TRUST_ENV] = ",".join([*_trusted_modules(), *modules])


def require_trusted_factory(spec: str, where: str) -> None:
    """Refuse to import the module of a ``package.module:factory`` named by a file.

    A run folder names its model; for a user factory, building the model imports that
    module, which runs its code. A run folder from elsewhere must not do that unasked. The
    factory is trusted when its module is already imported in this process (the caller
    imported it, so its code runs anyway) or when ``WHYLOOK_TRUST_MODEL_CODE`` names it or a
    package above it.

    >>> require_trusted_factory("torch.nn:Identity", "run r")  # torch.nn is imported
    """
    module = spec.partition(":")[0]
    if module in sys.modules:
        return
    trusted = _trusted_modules()
    if "*" in trusted or any(module == m or module.startswith(m + ".") for m in trusted):
        return
    raise WhylookError(
        f"{where} builds its model with {spec!r}, and importing {module!r} runs its code; if "
        f"you trust it, pass --trust-model-code {module} (or set {TRUST_ENV}={module})"
    )


def _build_user_model(
    spec: str, num_classes: int, in_channels: int, image_size: tuple[int, int]
) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    # importlib would take "" or ".rel" as a relative import and fail with a TypeError or
    # ValueError that does not say what a model name looks like.
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise WhylookError(
            f"model {spec!r} does not name a module; use package.module:factory with an "
            "absolute module path (e.g. my_models:build)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WhylookError(
            f"cannot import {module_name!r} for model {spec!r} ({exc}); make sure the package "
            "is installed or on PYTHONPATH"
        ) from None
    except Exception as exc:
        raise WhylookError(
            f"importing {module_name!r} for model {spec!r} raised {_describe(exc)}; fix the "
            "module (import it in Python to see the traceback)"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise WhylookError(
            f"{module_name} has no callable {attr!r} for model {spec!r}; name the function "
            "that builds the model, as package.module:factory"
        )
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise WhylookError(
            f"model factory {spec} cannot be called as factory(num_classes=..., in_channels=..., "
            f"image_size=...) ({exc}); give it those keyword arguments"
        ) from None
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will tell
    try:
        model = factory(**kwargs)
    except WhylookError:
        raise
    except Exception as exc:
        # Chained, so that a library caller still sees the factory's own traceback.
        raise WhylookError(
            f"the model factory {spec} raised {_describe(exc)}; fix the factory (call it in "
            "Python to see the traceback)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise WhylookError(
            f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module"
        )
    check_model(model, spec, num_classes=num_classes, input_shape=(in_channels, *image_size))
    return model


def check_model(
    model: nn.Module, name: str, *, num_classes: int, input_shape: Sequence[int]
) -> None:
    """Refuse a model whose weights or output whylook cannot use, with a one-line error.

    It must have parameters, its floating-point ones float32 (the images are float32), and
    one batch of two images of ``input_shape`` (C, H, W) must give one float logit per
    class, ``(2, num_classes)``. A wrong model would otherwise train and fail only later, deep
    inside training or ``explain`` (or never, giving wrong results). Built-in models meet
    this by construction; :func:`build_model` checks every user factory's model with it.

    >>> flat = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> check_model(flat, "flat", num_classes=3, input_shape=(1, 2, 2))
    Traceback (most recent call last):
    ...
    whylook.errors.WhylookError: model flat returns logits of shape (2, 2) for a batch of 2 ...
    """
    if next(model.parameters(), None) is None:
        raise WhylookError(
            f"model {name} has no parameters, so there is nothing to train; return a model "
            "with weights (e.g. nn.Conv2d and nn.Linear layers)"
        )
    tensors = [*model.parameters(), *model.buffers()]
    odd = next((t.dtype for t in tensors if t.is_floating_point() and t.dtype != torch.float32),
               None)
    if odd is not None:
        raise WhylookError(
            f"model {name} has {str(odd).removeprefix('torch.')} weights; return a float32 "
            "model (whylook feeds it float32 images), e.g. without .double() or .half()"
        )
    device = next(model.parameters()).device
    was_training = model.training
    try:
        # eval(): batch-norm statistics stay untouched; rng_kept(): dropout and any random
        # layer leave the seeded training stream as it was.
        model.eval()
        with torch.no_grad(), rng_kept(device):
            out = model(torch.zeros(2, *[int(s) for s in input_shape], device=device))
    except WhylookError:
        raise
    except Exception as exc:
        raise WhylookError(
            f"model {name} fails on {_fmt(input_shape)} input ({_describe(exc)}); check the "
            "data's channels and image size"
        ) from None
    finally:
        model.train(was_training)
    what = f"one (batch, {num_classes}) float tensor of logits, one per class"
    if not isinstance(out, torch.Tensor):
        raise WhylookError(
            f"model {name} returns a {type(out).__name__}, not a tensor; its forward must "
            f"return {what}"
        )
    if tuple(out.shape) != (2, num_classes):
        raise WhylookError(
            f"model {name} returns logits of shape {tuple(out.shape)} for a batch of 2 images, "
            f"not (2, {num_classes}); its forward must return one logit per class, "
            f"(batch, {num_classes})"
        )
    if not out.is_floating_point():
        raise WhylookError(
            f"model {name} returns {str(out.dtype).removeprefix('torch.')} logits; its forward "
            f"must return {what}"
        )


def check_trainable(model: nn.Module, name: str) -> None:
    """Refuse a model with nothing to train: torch would fail inside the first step.

    Only training needs this; ``explain`` takes its gradients with the weights frozen.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise WhylookError(
            f"model {name} has no trainable parameters (every one has requires_grad=False); "
            "leave at least some of its weights trainable"
        )


def _describe(exc: BaseException) -> str:
    """``TypeName: first line of the message``, short enough for a one-line error."""
    text = str(exc).strip()
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise WhylookError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WhylookError(
            f"device {device!r} was requested but torch sees no CUDA GPU; use device 'cpu' or "
            "'auto'"
        )
    if device == "cpu" or device.startswith("cuda"):
        return torch.device(device)
    raise WhylookError(f"unknown device {device!r}; use auto, cpu or cuda")


def rng_kept(device: torch.device | None = None) -> contextlib.AbstractContextManager[None]:
    """torch's random state (the CPU's, and ``device``'s if it is a GPU) as it was, after
    the block: whylook's seeding and its throwaway weight initialisations leave a caller's
    random numbers alone.

    >>> _ = torch.manual_seed(0); a = torch.rand(1)
    >>> _ = torch.manual_seed(0)
    >>> with rng_kept():
    ...     _ = torch.manual_seed(1)
    >>> bool(torch.rand(1) == a)
    True
    """
    return torch.random.fork_rng(
        devices=[device] if device is not None and device.type == "cuda" else [])


# ----------------------------------------------------------------------------- layers


def _nested_example(model: nn.Module) -> str:
    """A dotted name of one of the model's own layers, for the hint of a wrong name."""
    nested = [n for n, _ in model.named_modules() if n.count(".") == 1]
    return nested[len(nested) // 2] if nested else "block.conv"


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` (a ``named_modules()`` path such as ``layer3`` or ``block3``).

    >>> m = build_model("smallcnn", num_classes=2, in_channels=1, image_size=28)
    >>> type(get_layer(m, "block3.conv")).__name__
    'Conv2d'
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    top = [n for n, _ in model.named_children()]
    raise WhylookError(
        f"model has no layer {name!r}{hint}; top-level layers: {', '.join(top)} (name nested "
        f"ones with dots, e.g. {_nested_example(model)})"
    )


def default_layer(model: nn.Module, input_shape: Sequence[int] | None = None) -> str:
    """The model's default prototype layer: its ``whylook_layer`` attribute, or else (given
    ``input_shape`` = (C, H, W)) the deepest top-level layer with a spatial map.

    >>> default_layer(build_model("resnet50", num_classes=10, in_channels=1, image_size=28))
    'layer3'
    """
    name = getattr(model, "whylook_layer", None)
    if isinstance(name, str) and name:
        return name
    if input_shape is None:
        raise WhylookError(
            f"{type(model).__name__} has no whylook_layer attribute; choose one with "
            f"{option('layer')} NAME (top-level layers: "
            f"{', '.join(n for n, _ in model.named_children())})"
        )
    candidates = _spatial_layers(model, input_shape)
    if not candidates:
        raise WhylookError(
            f"no layer of {type(model).__name__} gives a (B, d, h, w) map with h*w >= 4 on "
            f"{_fmt(input_shape)} input; the method needs a convolutional feature map"
        )
    return candidates[-1][0]


def layer_shape(model: nn.Module, layer: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """The ``(d, h, w)`` output of ``layer`` for one input of shape ``(C, H, W)``.

    A layer whose output is not ``(B, d, h, w)`` with ``h*w >= 4`` (docs/METHOD-NOTES.md,
    Step 1) raises a :class:`WhylookError` that names layers which would work.

    >>> m = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    >>> layer_shape(m, "layer3", (1, 28, 28))
    (256, 7, 7)
    """
    module = get_layer(model, layer)
    shapes = _trace(model, input_shape, {layer: module})
    shape = shapes.get(layer)
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] >= 4:
        return int(shape[1]), int(shape[2]), int(shape[3])
    if shape is None:
        what = "is not used by the model's forward pass"
    elif len(shape) == 4:
        what = f"gives a {shape[2]}x{shape[3]} map (needs h*w >= 4)"
    else:
        what = f"gives output of shape {list(shape)}, not (B, d, h, w)"
    good = _spatial_layers(model, input_shape)[-6:]
    listing = ", ".join(f"{n} ({d}x{h}x{w})" for n, (d, h, w) in good) or "none"
    raise WhylookError(
        f"layer {layer!r} {what} on {_fmt(input_shape)} input; layers that work: {listing}"
    )


def _fmt(input_shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in input_shape)


def _spatial_layers(
    model: nn.Module, input_shape: Sequence[int]
) -> list[tuple[str, tuple[int, int, int]]]:
    """Layers with a usable map, shallowest names first, in forward order."""
    modules = {
        n: m for n, m in model.named_modules() if n and not isinstance(m, Normalize | nn.Identity)
    }
    shapes = _trace(model, input_shape, modules)
    good = [(n, s) for n, s in shapes.items() if len(s) == 4 and s[2] * s[3] >= 4]
    if not good:
        return []
    # Prefer whole blocks (layer3) over their insides (layer3.5.conv2): shallowest names.
    depth = min(n.count(".") for n, _ in good)
    return [(n, (s[1], s[2], s[3])) for n, s in good if n.count(".") == depth]


def _trace(
    model: nn.Module, input_shape: Sequence[int], modules: dict[str, nn.Module]
) -> dict[str, tuple[int, ...]]:
    """Output shapes of ``modules`` for one zero input, in the order they finish."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if name not in shapes:
                shapes[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else ()

        handles.append(module.register_forward_hook(hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        # eval(): batch-norm with a batch of one and a 1x1 map fails in training mode.
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *[int(s) for s in input_shape], device=device, dtype=dtype))
    except WhylookError:
        raise
    except Exception as exc:
        raise WhylookError(
            f"{type(model).__name__} fails on {_fmt(input_shape)} input ({_describe(exc)}); "
            "check the data's channels and image size"
        ) from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes
