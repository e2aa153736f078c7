"""2x2 max-pooling on CPU without its indices, for the passes of the analysis.

``nn.MaxPool2d(2)`` is in most small CNNs. On CPU, torch runs it through
``max_pool2d_with_indices`` even when no gradient will be asked for: it writes an int64
index per output next to the output, and in the NCHW layout its kernel walks each channel
on its own. Before the prototype layer no gradient is ever needed, and there the same
output is two ``torch.maximum`` calls over strided views (rows, then columns), with no
index and vectorised in either layout: on a (256, 16, 28, 28) batch 1.5 ms against
15 ms in NCHW and 1.2 ms against 1.9 ms in NHWC (one thread, benchmarks/RESULTS.md).
A user's model runs in NCHW whenever it fails in NHWC (a ``.view`` after a convolution),
which is where this matters most.

The values are max-pooling's exactly (a maximum is exact in any dtype, and a NaN in a
window gives NaN either way; only the sign of a zero may differ where a window holds both
0.0 and -0.0), and so is the memory layout of the output.

What is replaced, and only for the length of a ``with`` block: the ``forward`` of each
``nn.MaxPool2d`` instance (not a subclass) with a 2x2 window, stride 2, no padding, no
dilation, floor rounding and no indices returned, that is not the prototype layer and
whose ``forward`` the caller has not already replaced. Module hooks still run around it.
Per call, a pooling whose input autograd would record (after the layer), or that is not a
dense 4-D floating-point CPU tensor of at least 2 x 2, runs torch's own ``forward``. Removing
the instance attribute on exit (also on error) restores the module exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["fast_max_pool", "max_pool_2x2"]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` of a 4-D tensor, computed without indices.

    >>> x = torch.randn(2, 3, 5, 6)
    >>> torch.equal(max_pool_2x2(x), torch.nn.functional.max_pool2d(x, 2))
    True
    """
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[:, :, 0:h:2, :w], x[:, :, 1:h:2, :w])
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


def _is_2x2(pool: nn.Module) -> bool:
    def pair(v: object) -> object:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (
        type(pool) is nn.MaxPool2d
        and "forward" not in vars(pool)
        and pair(pool.kernel_size) == (2, 2)
        and pair(pool.stride) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


class _FastForward:
    """The replacement ``forward`` of one ``nn.MaxPool2d`` instance."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        self.pool = pool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            isinstance(x, torch.Tensor)
            and x.ndim == 4
            and x.device.type == "cpu"
            and x.layout == torch.strided
            and x.is_floating_point()
            and x.shape[-2] >= 2
            and x.shape[-1] >= 2
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            return max_pool_2x2(x)
        return nn.MaxPool2d.forward(self.pool, x)


@contextmanager
def fast_max_pool(model: nn.Module, keep: tuple[nn.Module, ...] = ()) -> Iterator[int]:
    """Pool with :func:`max_pool_2x2` in the model's 2x2 ``nn.MaxPool2d`` modules for the
    block; yields how many modules were given it.

    ``keep``: modules left as they are (the prototype layer). Nothing is replaced in a
    model whose parameters are not on the CPU.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten())
    >>> x = torch.rand(2, 1, 6, 6)
    >>> with torch.no_grad(), fast_max_pool(net) as count:
    ...     same = torch.equal(net(x), net[2](nn.functional.max_pool2d(net[0](x), 2)))
    >>> count, same, "forward" in vars(net[1])
    (1, True, False)
    """
    patched: list[nn.Module] = []
    try:
        if all(p.device.type == "cpu" for p in model.parameters()):
            keep_ids = {id(m) for m in keep}
            for module in model.modules():
                if id(module) not in keep_ids and _is_2x2(module):
                    assert isinstance(module, nn.MaxPool2d)
                    module.forward = _FastForward(module)  # type: ignore[method-assign]
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            vars(module).pop("forward", None)
