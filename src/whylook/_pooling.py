"""2x2 max-pooling on CPU without its indices, for the passes of the analysis.

Max-pooling over 2x2 windows is in most small CNNs, as ``nn.MaxPool2d(2)`` or as
``F.max_pool2d(x, 2)`` in a ``forward``. On CPU, torch runs it through
``max_pool2d_with_indices`` even when no gradient will be asked for: it writes an int64
index per output next to the output, and in the NCHW layout its kernel walks each channel
on its own. Before the prototype layer no gradient is ever needed, and there the same
output is two ``torch.maximum`` calls over strided views (rows, then columns), with no
index and vectorised in either layout: on a (256, 16, 28, 28) batch 1.5 ms against
15 ms in NCHW and 1.2 ms against 1.9 ms in NHWC (one thread, benchmarks/RESULTS.md). A
user's model runs in NCHW whenever it fails in NHWC (a ``.view`` after a convolution),
which is where this matters most.

The values are max-pooling's exactly (a maximum is exact in any dtype, and a NaN in a
window gives NaN either way; only the sign of a zero may differ where a window holds both
0.0 and -0.0), and so is the memory layout of the output.

How: :func:`fast_max_pool` is a ``TorchFunctionMode``, active in the calling thread only
and only while whylook runs the model's forward. It sees every call of
``F.max_pool2d`` and ``torch.max_pool2d`` (``nn.MaxPool2d`` calls the first), and answers
those with a 2x2 window, stride 2, no padding, no dilation, floor rounding and no indices
returned, on a plain dense 4-D floating-point CPU tensor of at least 2 x 2 that autograd
does not record (so, before the layer); every other call, and every other function, runs
as it would. No module of the model is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["fast_max_pool", "max_pool_2x2"]

#: The parameter names of ``F.max_pool2d`` and ``torch.max_pool2d``, in their order.
_PARAMETERS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
               "return_indices")
_DEFAULTS: dict[str, Any] = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                             "return_indices": False}


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` of a 4-D tensor, computed without indices.

    >>> x = torch.randn(2, 3, 5, 6)
    >>> torch.equal(max_pool_2x2(x), torch.nn.functional.max_pool2d(x, 2))
    True
    """
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w])
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


def _pair(v: object) -> tuple[Any, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(v) * 2 if len(v) == 1 else tuple(v)
    return (v, v)


def _plain_2x2_input(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The input of a max-pooling call that :func:`max_pool_2x2` computes exactly, else None."""
    if len(args) > len(_PARAMETERS):
        return None
    call = {**_DEFAULTS, **dict(zip(_PARAMETERS, args, strict=False)), **kwargs}
    x, stride = call.get("input"), call["stride"]
    if not (
        type(x) is torch.Tensor
        and _pair(call.get("kernel_size")) == (2, 2)
        and (stride is None or (isinstance(stride, (tuple, list)) and not stride)
             or _pair(stride) == (2, 2))
        and _pair(call["padding"]) == (0, 0)
        and _pair(call["dilation"]) == (1, 1)
        and call["ceil_mode"] is False
        and call["return_indices"] is False
    ):
        return None
    fits = (
        x.ndim == 4
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and x.is_floating_point()
        and x.shape[-2] >= 2
        and x.shape[-1] >= 2
        and not (torch.is_grad_enabled() and x.requires_grad)
    )
    return x if fits else None


class _FastMaxPool(TorchFunctionMode):
    """Answers the max-pooling calls :func:`max_pool_2x2` computes exactly; passes on the
    rest. (torch takes the mode off its stack while this runs, so the calls made here,
    including ``func`` itself, are not seen again.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d or func is torch.max_pool2d:
            x = _plain_2x2_input(args, kwargs)
            if x is not None:
                self.calls += 1
                return max_pool_2x2(x)
        return func(*args, **kwargs)


def fast_max_pool() -> _FastMaxPool:
    """A context manager under which plain 2x2 max-pooling on CPU, where autograd does not
    record it, is computed by :func:`max_pool_2x2` (in this thread; ``.calls`` counts them).

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten())
    >>> x = torch.rand(2, 1, 6, 6)
    >>> with torch.no_grad(), fast_max_pool() as pool:
    ...     same = torch.equal(net(x), net[2](torch.max_pool2d(net[0](x), 2)))
    >>> pool.calls, same
    (2, True)
    """
    return _FastMaxPool()
