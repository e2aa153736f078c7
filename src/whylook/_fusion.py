"""oneDNN kernels on CPU for the layers before the prototype layer, for the analysis passes.

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

**Runs in oneDNN's blocked layout.** In float32 without autocast, a run of entries of one
container that starts with a ``Conv2d`` and goes on with ``Conv2d``, ``ReLU`` and
``MaxPool2d`` (under the same conditions as a pair, and the pooling without indices or
dilation, its padding at most half its window) runs on oneDNN's own tensors
(``to_mkldnn``), whose channels are blocked by 16: there oneDNN picks its direct
convolution instead of the matrix-product one it takes for NHWC, and its own pooling. A
convolution directly followed by a ReLU is one kernel call with the ReLU as its post-op,
as for the pairs (the same kernel takes blocked tensors). Any other ReLU right before a
max-pooling runs after it, on a quarter of the values (the same values: the maximum of
ReLUs is the ReLU of the maximum). On ``smallcnn``'s layers before its prototype layer
that is 24.3 ms a batch of 256 against 29.2 ms in NHWC (24.9 ms with each ReLU a step of
its own), and the whole pass 1.07-1.12x faster (benchmarks/RESULTS.md, "oneDNN's blocked
layout before the layer"), as long as the runs convert little:

* a run goes on through nested containers that only run their entries in order (plain
  ``nn.Sequential`` entries without hooks): what each hands the next is then known;
* a run hands back an ordinary tensor in the layout eager torch would give, so whatever
  the caller's code does with it before the next container (in place or not) counts;
* a run followed by a kept container the caller named in ``takes_blocked`` (whylook's
  prototype layer, whose one hook reads only its output) calls it on the blocked tensor;
  that container's run hands its output to the hook as it leaves oneDNN's layout
  (``to_dense``: NCHW), and where eager torch would give NHWC the hook, which copies the
  output for the network anyway, makes that copy in NHWC (:func:`eager_layout`): one
  copy of the layer's output a batch instead of two.

Values are the plain pass's up to float rounding (the convolutions sum in another order).

oneDNN's ReLU and max-pooling drop NaN (a NaN becomes 0, or loses to any number), where
torch's propagate it; the check for NaN logits downstream would then never see a NaN
pixel or a diverged weight. So each run and each pair first bounds what it can compute:
the largest magnitude of its input, times each convolution's largest sum of weight
magnitudes, plus its bias (ReLU and max-pooling never raise it). A NaN or an infinity in
the input or the weights, or a bound past 1e30 (an overflow to infinity, and from there a
NaN, becomes possible), and it runs plain. Two reductions over the input (``amax``,
``amin``) and one over the weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from whylook._pooling import _pair

__all__ = ["available", "eager_layout", "fused_conv_relu"]

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


def _conv_relu(kernel: Kernel, x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``relu(conv(x))`` as one call of oneDNN's kernel, in ``x``'s layout (NCHW, NHWC or
    its blocked one), with ``conv``'s geometry and the given (possibly cast) weight and
    bias."""
    assert not isinstance(conv.padding, str)  # _fusable, _blockable
    return kernel(x, weight, bias, list(conv.padding), list(conv.stride),
                  list(conv.dilation), conv.groups, "relu", [], "")


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


def _blocked_available() -> bool:
    """Whether oneDNN's own tensors can run the layers (see the module docstring)."""
    return _kernel() is not None and hasattr(torch, "mkldnn_convolution")


def _blockable(module: nn.Module | None, keep: set[int]) -> bool:
    if module is None or id(module) in keep or _has_hooks(module) or "forward" in vars(module):
        return False
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if type(module) is nn.MaxPool2d:
        # oneDNN's pooling has no dilation (torch's refuses it on blocked tensors), and
        # takes padding beyond half the window that torch refuses: those stay with torch.
        kernel, padding = _pair(module.kernel_size), _pair(module.padding)
        return (not module.return_indices and _pair(module.dilation) == (1, 1)
                and all(p <= k // 2 for p, k in zip(padding, kernel, strict=True)))
    return type(module) is nn.ReLU


def _run_entries(module: nn.Module, keep: set[int]) -> list[nn.Module] | None:
    """The layers ``module`` runs, in order, when all of them can run blocked: itself, or
    the entries of an ``nn.Sequential`` (and of those nested in it) that only runs them in
    order; ``None`` when any cannot."""
    if isinstance(module, nn.Sequential):
        patch = vars(module).get("forward")
        if (id(module) in keep or _has_hooks(module)
                or type(module).forward is not nn.Sequential.forward
                or not (patch is None or isinstance(patch, _FusedForward))):
            return None
        return _entries_of(module, keep)
    return [module] if _blockable(module, keep) else None


def _entries_of(container: nn.Module, keep: set[int]) -> list[nn.Module] | None:
    """The layers a container's entries run, in order, when all can run blocked."""
    layers: list[nn.Module] = []
    for entry in container._modules.values():
        inner = None if entry is None else _run_entries(entry, keep)
        if inner is None:
            return None
        layers += inner
    return layers


def _nhwc(t: torch.Tensor) -> bool:
    """Whether torch takes ``t`` for NHWC: its strides are ordered C < W < H < N, where a
    size-1 dimension may share its neighbour's stride (c10's
    ``is_channels_last_strides_2d``). ``is_contiguous`` cannot tell: with one channel, or a
    1x1 kernel, a tensor is contiguous in both layouts while its strides say which one
    torch (and eager convolution's output) will use."""
    if t.ndim != 4 or t.stride(1) == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if t.shape[d] == 0 or t.stride(d) < low or (d == 0 and low == t.stride(1)):
            return False
        low = t.stride(d) * max(t.shape[d], 1)
    return True


#: A bound on every value a run may compute above which it runs plain instead: far below
#: float32's largest (3.4e38), so no sum inside oneDNN's kernels can overflow to infinity.
_LIMIT = 1e30


def _bound(t: torch.Tensor) -> float:
    """The largest magnitude in ``t`` (NaN or infinity where ``t`` holds one), without a
    mask or an ``abs`` tensor: on a (256, 16, 14, 14) NHWC batch ``amax`` and ``amin``
    took 0.23 ms, ``aminmax`` 0.58 ms, ``isfinite(t).all()`` and ``vector_norm(t, inf)``
    2 ms."""
    t = t.detach()
    high, low = float(t.amax()), float(t.amin())
    return high if high != high else max(abs(high), abs(low))  # a NaN stays NaN


def _within(convs: Sequence[nn.Conv2d], bound: float) -> bool:
    """Whether input values of at most ``bound`` keep every value these convolutions (with
    any ReLU and max-pooling between them, which never raise a bound) compute finite:
    each output is at most its channel's sum of weight magnitudes times the input bound,
    plus its bias. A NaN or infinite bound, weight or bias fails it."""
    for conv in convs:
        weight = conv.weight.detach()
        gain = float(weight.abs().sum(dim=(1, 2, 3)).amax()) if weight.numel() else 0.0
        shift = 0.0 if conv.bias is None else _bound(conv.bias) if conv.bias.numel() else 0.0
        bound = gain * bound + shift
        if not bound <= _LIMIT:  # also False for NaN
            return False
    return True


class _Shared:
    """What the replaced containers of one ``with`` block share: whether fused pairs and
    blocked runs are on, which kept containers may take a blocked input, and the blocked
    tensor a run is passing to one."""

    def __init__(self, kernel: Kernel, blocked: bool, takes_blocked: set[int]) -> None:
        self.kernel: Kernel | None = kernel
        self.blocked = blocked
        self.takes_blocked = takes_blocked
        #: The blocked tensor a run passes to a kept container as its input, with its layout.
        self.passing: tuple[torch.Tensor, bool] | None = None
        #: A kept container's output handed to its hook in NCHW where eager gives NHWC.
        self.relayout: torch.Tensor | None = None


class _FusedForward:
    """The replacement ``forward`` of one ``nn.Sequential``: its modules in order, each
    blockable run in oneDNN's blocked layout, else each fusable pair as one kernel call.
    Decided per call, so it follows the container's current entries and hooks."""

    def __init__(self, seq: nn.Sequential, shared: _Shared, keep: set[int]) -> None:
        self.seq = seq
        self.shared = shared
        self.keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self.seq._modules.values())
        if isinstance(x, torch.Tensor) and x.layout == torch._mkldnn:  # type: ignore[attr-defined]
            x, done = self._from_blocked(x)
            if done:
                return x
        autocast = _autocast_dtype()  # the same for the whole container's call
        hooked = _global_hooks()  # so are the global module hooks
        i = 0
        while i < len(modules):
            conv = modules[i]
            fits = self._fits(x, autocast) and not hooked
            if fits and autocast is None and self.shared.blocked:
                # A run goes on through the entries of nested containers that only run
                # their entries in order (as smallcnn's blocks in smallcnn): what each hands
                # to the next is then known, and stays blocked.
                run: list[nn.Module] = []
                end = i
                while end < len(modules):
                    inner = _run_entries(modules[end], self.keep)
                    if inner is None:
                        break
                    run += inner
                    end += 1
                if run and type(run[0]) is nn.Conv2d:
                    after = modules[end] if end < len(modules) else None
                    then = None if after is None else self._layer_run(after)
                    if after is not None and then is not None:
                        # The prototype layer, run here on the blocked tensor (its own run
                        # checked with this one): its hook sees its output, an ordinary
                        # tensor.
                        blocked = self._blocked(run, x, dense=False, then=then)
                        if blocked is not None:
                            x = after(blocked)
                            i = end + 1
                            continue
                    out = self._blocked(run, x) if self.shared.blocked else None
                    if out is not None:
                        x = out
                        i = end
                        continue
            if (i + 1 < len(modules) and fits
                    and _fusable(conv, modules[i + 1], self.keep)):
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
            self.shared.kernel is not None
            and isinstance(x, torch.Tensor)
            and x.ndim == 4
            and x.device.type == "cpu"
            and x.layout == torch.strided
            and (x.dtype == torch.float32 if autocast is None
                 else autocast == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16))
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    @staticmethod
    def _checked(convs: Sequence[nn.Conv2d], x: torch.Tensor) -> bool:
        """Whether oneDNN may run these convolutions on ``x``: no gradient to record, and
        nothing that could make a NaN, which its ReLU and pooling would drop (a NaN or an
        infinity in ``x`` or a weight, or values large enough to overflow)."""
        params = [p for c in convs for p in (c.weight, c.bias) if p is not None]
        if x.numel() == 0 or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return False  # an empty batch has no largest value: torch's own layers take it
        return _within(convs, _bound(x))

    def _entries_run(self, container: nn.Module) -> list[nn.Module] | None:
        """The layers of a kept container as one run, when all can run blocked."""
        run = _entries_of(container, self.keep)
        return run if run and type(run[0]) is nn.Conv2d else None

    def _layer_run(self, module: nn.Module) -> list[nn.Module] | None:
        """The run of ``module`` (the prototype layer) when it may get a blocked tensor as
        its input: the caller said so (its only hook, whylook's, reads its output alone),
        nothing else hooks it, and its entries make one run that turns it back into an
        ordinary tensor."""
        if not (
            id(module) in self.shared.takes_blocked
            and isinstance(vars(module).get("forward"), _FusedForward)
            and not module._forward_pre_hooks
            and len(module._forward_hooks) <= 1
            and not module._backward_hooks
            and not getattr(module, "_backward_pre_hooks", None)
        ):
            return None
        return self._entries_run(module)

    def _from_blocked(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """A kept container's call on the blocked tensor a run passed it: its run's
        ordinary output and True; or, when that run cannot go on, the input as an ordinary
        tensor and False, for the container's entries to run on as they would."""
        passing, self.shared.passing = self.shared.passing, None
        ours = passing is not None and passing[0] is x
        nhwc = ours and passing is not None and passing[1]
        run = self._entries_run(self.seq)
        # The run that passed it checked this container's convolutions with its own.
        out = None if run is None or not ours else self._blocked(
            run, x, nhwc=nhwc, checked=True, relayout=bool(self.seq._forward_hooks))
        if out is not None:
            return out, True
        dense = x.to_dense()
        return (dense.contiguous(memory_format=torch.channels_last) if nhwc else dense), False

    def _blocked(self, run: list[nn.Module], x: torch.Tensor, *, dense: bool = True,
                 then: Sequence[nn.Module] = (), nhwc: bool = False,
                 checked: bool = False, relayout: bool = False) -> torch.Tensor | None:
        """The run on blocked tensors: its output as an ordinary tensor in the input's
        layout (``relayout``, for a kept container's hook: in NCHW, noted for
        :func:`eager_layout` where that layout is NHWC), or (``dense=False``, for the
        kept container whose run is ``then``) blocked; ``None`` when it cannot run so."""
        convs = [m for m in run if isinstance(m, nn.Conv2d)]
        later = [m for m in then if isinstance(m, nn.Conv2d)]
        if not checked and not self._checked(convs + later, x):
            return None
        try:
            # The layout eager torch would give: NHWC when the input or any convolution's
            # weight is (each convolution writes NHWC when its input or weight is, and
            # ReLU and pooling keep their input's); a one-channel weight reads as NCHW.
            h = x if x.layout != torch.strided else x.to_mkldnn()
            nhwc = ((nhwc if x.layout != torch.strided else _nhwc(x))
                    or any(_nhwc(c.weight) for c in convs))
            k = 0
            while k < len(run):
                m = run[k]
                after = run[k + 1] if k + 1 < len(run) else None
                if isinstance(m, nn.Conv2d):
                    assert not isinstance(m.padding, str)  # _blockable
                    kernel = self.shared.kernel
                    if isinstance(after, nn.ReLU) and kernel is not None:
                        # The ReLU as the convolution's post-op: no pass of its own,
                        # cheaper even than one over a following pooling's quarter.
                        h = _conv_relu(kernel, h, m, m.weight, m.bias)
                        k += 1
                    else:
                        h = torch.mkldnn_convolution(h, m.weight, m.bias, m.padding,
                                                     m.stride, m.dilation, m.groups)
                elif isinstance(m, nn.ReLU):
                    if isinstance(after, nn.MaxPool2d):
                        h = self._pool(after, h)
                        k += 1
                    h = torch.relu_(h)  # h is always a tensor of the run's own
                else:
                    assert isinstance(m, nn.MaxPool2d)
                    h = self._pool(m, h)
                k += 1
            if not dense:
                self.shared.passing = (h, nhwc)
                return h
            out = h.to_dense()
        except (RuntimeError, NotImplementedError):
            # A build or input oneDNN's tensors do not take: the pairs from now on.
            self.shared.blocked = False
            return None
        if nhwc and relayout and not out.is_contiguous(memory_format=torch.channels_last):
            self.shared.relayout = out
            return out
        return out.contiguous(memory_format=torch.channels_last) if nhwc else out

    @staticmethod
    def _pool(m: nn.MaxPool2d, h: torch.Tensor) -> torch.Tensor:
        return torch.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.ceil_mode)

    def _fused(self, conv: nn.Conv2d, x: torch.Tensor,
               autocast: torch.dtype | None) -> torch.Tensor | None:
        if not self._checked([conv], x):
            return None
        kernel = self.shared.kernel
        assert kernel is not None
        weight, bias = conv.weight, conv.bias
        if autocast is not None:  # bfloat16, as _fits allowed
            x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
            bias = None if bias is None else bias.to(torch.bfloat16)
        try:
            return _conv_relu(kernel, x, conv, weight, bias)
        except (RuntimeError, NotImplementedError):
            # A build or input the kernel does not take: the plain path from now on.
            self.shared.kernel = None
            return None


def eager_layout(module: nn.Module, out: torch.Tensor) -> torch.memory_format | None:
    """For the one forward hook of a ``takes_blocked`` container: the memory format that
    ``out``, its output, would have in eager torch, when its run handed it over in
    another (``torch.channels_last``: the hook must hand the network a copy in it, as
    ``out.clone(memory_format=...)``), else ``None``. Asked once per output.

    >>> eager_layout(nn.ReLU(), torch.zeros(1, 2, 3, 3)) is None
    True
    """
    forward = vars(module).get("forward")
    if not isinstance(forward, _FusedForward) or forward.shared.relayout is not out:
        return None
    forward.shared.relayout = None
    return torch.channels_last


@contextmanager
def fused_conv_relu(model: nn.Module, keep: tuple[nn.Module, ...] = (),
                    takes_blocked: tuple[nn.Module, ...] = ()) -> Iterator[int]:
    """Fuse the model's ``Conv2d -> ReLU`` pairs for the block; yields how many containers
    run fused.

    ``keep``: modules whose own output must stay visible (the prototype layer); a pair
    or run that contains one is left alone. ``takes_blocked``: kept ``nn.Sequential``
    containers whose input may be a blocked tensor (whylook's prototype layer, whose only
    hook reads the output alone): the run before one then calls it on its blocked output,
    and its own run hands back an ordinary tensor, which its hook hands the network as a
    copy in :func:`eager_layout`'s layout; with any other hook on it, it gets an ordinary
    tensor. Nothing is fused where :func:`available` is false.

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
    shared = None if kernel is None else _Shared(kernel, _blocked_available(),
                                                 {id(m) for m in takes_blocked})
    try:
        if shared is not None and available(model):
            keep_ids = {id(m) for m in keep}
            for seq in model.modules():
                # The container's own hooks see its input and output, which fusing leaves as
                # they were; only its entries' hooks rule a pair out.
                if type(seq).forward is not nn.Sequential.forward or "forward" in vars(seq):
                    continue
                assert isinstance(seq, nn.Sequential)
                entries = list(seq._modules.values())
                if any(_fusable(a, b, keep_ids) for a, b in itertools.pairwise(entries)) or (
                        shared.blocked and any(
                            any(type(m) is nn.Conv2d for m in _run_entries(e, keep_ids) or ())
                            for e in entries if e is not None)):
                    seq.forward = _FusedForward(seq, shared, keep_ids)  # type: ignore[method-assign]
                    patched.append(seq)
        yield len(patched)
    finally:
        for seq in patched:
            vars(seq).pop("forward", None)
        if shared is not None:
            shared.passing = shared.relayout = None
