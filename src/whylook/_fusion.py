"""Convolution + ReLU as one oneDNN kernel on CPU, for the passes of the analysis.

On ``smallcnn`` a Grad-CAM pass is almost all forward pass before the prototype layer,
and a fifth to a quarter of that is out-of-place ReLUs: each writes a new tensor as large
as the convolution's output, only to be read once by the next layer. oneDNN's convolution
applies the ReLU as it writes its output (``torch.ops.mkldnn._convolution_pointwise``,
the kernel PyTorch's own compiler uses on CPU), so that pass and its memory go away. The
values are those of the convolution followed by the ReLU up to float rounding (bit for bit
on ``smallcnn`` in the NHWC layout; ``tests/test_fusion.py`` checks them against the
unfused pass).

What is fused, and only for the length of a ``with`` block:

* a ``Conv2d`` directly followed by a ``ReLU`` in an ``nn.Sequential`` (the container
  feeds the convolution's output to the ReLU and to nothing else);
* only when neither has hooks, neither is the prototype layer (whose output a hook must
  see), the convolution pads with zeros and numbers, and no global module hook is set.

The container's ``forward`` is replaced on the instance, not its entries: ``seq[0]`` and
``seq[1]`` stay the convolution and the ReLU, so a model that also calls them on their own
(``self.body[1](x)``) gets what it always got, and removing the instance attribute on exit
(also on error) restores the container exactly.

The kernel is an internal operator of torch (the project pins torch 2.14.1): where a
build lacks it nothing is fused, and where it raises, the pair runs unfused from then on.

The fused kernel has no backward, so a pair runs unfused whenever autograd would record
it (after the prototype layer, where the logits' gradient flows), and whenever its input
is not a 4-D float32 CPU tensor.

Under CPU autocast in bfloat16 (whylook's ``precision="bfloat16"``), a pair runs fused in
bfloat16: input, weight and bias cast as autocast casts them for the convolution, so the
values are those of the autocast pass (bit for bit on ``smallcnn``); autocast has no rule
for the internal operator and would leave it in float32. Under autocast in another dtype
nothing is fused, and autocast keeps its say.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["available", "fused_conv_relu"]

Kernel = Callable[..., torch.Tensor]


def _kernel() -> Kernel | None:
    # A caller who turned oneDNN off (torch.backends.mkldnn.enabled = False) gets torch's
    # other convolutions, unfused.
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


def _autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast would cast the convolution to, or ``None`` when it is off."""
    if not torch.is_autocast_enabled("cpu"):
        return None
    return torch.get_autocast_dtype("cpu")


def available(model: nn.Module) -> bool:
    """Whether fusing can apply: a float32 CPU model, with oneDNN's kernel in this torch."""
    params = list(model.parameters())
    return (
        _kernel() is not None
        and bool(params)
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
        and not isinstance(model, torch.jit.ScriptModule)
    )


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as mod

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(bool(getattr(mod, name, None)) for name in names)


def _fusable(conv: nn.Module | None, relu: nn.Module | None, keep: set[int]) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(relu) is nn.ReLU
        and id(conv) not in keep
        and id(relu) not in keep
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not _has_hooks(conv)
        and not _has_hooks(relu)
        # A forward set on the instance (a wrapper, an adapter) is the user's code: it runs.
        and "forward" not in vars(conv)
        and "forward" not in vars(relu)
    )


class _FusedForward:
    """The replacement ``forward`` of one ``nn.Sequential``: its modules in order, each
    fusable pair as one kernel call. Decided per call, so it follows the container's
    current entries and hooks."""

    def __init__(self, seq: nn.Sequential, kernel: Kernel, keep: set[int]) -> None:
        self.seq = seq
        self.kernel: Kernel | None = kernel
        self.keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self.seq._modules.values())
        autocast = _autocast_dtype()  # the same for the whole container's call
        i = 0
        while i < len(modules):
            conv = modules[i]
            if (i + 1 < len(modules) and self._fits(x, autocast)
                    and _fusable(conv, modules[i + 1], self.keep) and not _global_hooks()):
                assert isinstance(conv, nn.Conv2d)
                out = self._fused(conv, x, autocast)
                if out is not None:
                    x = out
                    i += 2
                    continue
            assert conv is not None
            x = conv(x)
            i += 1
        return x

    def _fits(self, x: object, autocast: torch.dtype | None) -> bool:
        return (
            self.kernel is not None
            and isinstance(x, torch.Tensor)
            and x.ndim == 4
            and x.device.type == "cpu"
            and (x.dtype == torch.float32 if autocast is None
                 else autocast == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16))
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def _fused(self, conv: nn.Conv2d, x: torch.Tensor,
               autocast: torch.dtype | None) -> torch.Tensor | None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in conv.parameters()):
            return None
        assert self.kernel is not None
        weight, bias = conv.weight, conv.bias
        if autocast is not None:  # bfloat16, as _fits allowed
            x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            bias = None if bias is None else bias.to(torch.bfloat16)
        try:
            return self.kernel(x, weight, bias, list(conv.padding), list(conv.stride),
                               list(conv.dilation), conv.groups, "relu", [], "")
        except (RuntimeError, NotImplementedError):
            # A build or input the kernel does not take: the plain path from now on.
            self.kernel = None
            return None


@contextmanager
def fused_conv_relu(model: nn.Module, keep: tuple[nn.Module, ...] = ()) -> Iterator[int]:
    """Fuse the model's ``Conv2d -> ReLU`` pairs for the block; yields how many containers
    run fused.

    ``keep``: modules whose own output must stay visible (the prototype layer); a pair
    that contains one is left alone. Nothing is fused where :func:`available` is false.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
    >>> x = torch.rand(2, 1, 5, 5)
    >>> with torch.no_grad(), fused_conv_relu(net) as count:
    ...     same = torch.allclose(net(x), net[2](torch.relu(net[0](x))))
    >>> count if available(net) else 1, same, "forward" in vars(net)
    (1, True, False)
    """
    kernel = _kernel()
    patched: list[nn.Sequential] = []
    try:
        if kernel is not None and available(model):
            keep_ids = {id(m) for m in keep}
            for seq in model.modules():
                # The container's own hooks see its input and output, which fusing leaves as
                # they were; only its entries' hooks rule a pair out.
                if type(seq).forward is not nn.Sequential.forward or "forward" in vars(seq):
                    continue
                assert isinstance(seq, nn.Sequential)
                entries = list(seq._modules.values())
                if any(_fusable(a, b, keep_ids) for a, b in itertools.pairwise(entries)):
                    seq.forward = _FusedForward(seq, kernel, keep_ids)  # type: ignore[method-assign]
                    patched.append(seq)
        yield len(patched)
    finally:
        for seq in patched:
            vars(seq).pop("forward", None)
