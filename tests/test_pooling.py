"""2x2 max-pooling without indices on CPU: max-pooling's values and layout, the model put back."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from whylook import _pooling
from whylook.saliency import GradCAM, grad_cam, layer_features


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (2, 3, 5, 7), (1, 4, 2, 2), (3, 2, 3, 2)])
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_values_and_layout_are_max_pooling_s(shape: tuple[int, ...], nhwc: bool,
                                             dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[-1, -1, 1, 1] = float("-inf")
    x = torch.relu(x) if dtype == torch.float64 else x  # ties at zero as after a ReLU
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = _pooling.max_pool_2x2(x), F.max_pool2d(x, 2)
    assert ours.dtype == ref.dtype
    assert ours.shape == ref.shape
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(ref))
    # The same layout, so that a model's ``.view`` after the pooling works as it did.
    for layout in (torch.contiguous_format, torch.channels_last):
        assert ours.is_contiguous(memory_format=layout) == ref.is_contiguous(memory_format=layout)


class _Pools(nn.Module):
    """Poolings of every kind, as modules and as functions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.plain = nn.MaxPool2d(2)
        self.tuple_form = nn.MaxPool2d((2, 2), stride=(2, 2), padding=0, dilation=1)
        self.overlapping = nn.MaxPool2d(2, stride=1)
        self.resnet_stem = nn.MaxPool2d(3, stride=2, padding=1)
        self.ceil = nn.MaxPool2d(2, ceil_mode=True)
        self.dilated = nn.MaxPool2d(2, dilation=2)
        self.indices = nn.MaxPool2d(2, return_indices=True)
        self.subclass = type("MyPool", (nn.MaxPool2d,), {})(2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.plain(torch.relu(self.conv(x)))  # 8x8 -> 4x4
        a = (self.tuple_form(a) + self.subclass(a) + F.max_pool2d(a, 2)
             + torch.max_pool2d(a, [2, 2]) + F.max_pool2d(a, kernel_size=2, stride=2)
             + self.ceil(a)[..., :2, :2] + self.overlapping(a)[..., :2, :2]
             + self.resnet_stem(a) + self.indices(a)[0] + F.max_pool2d(a, 2, stride=1)[..., :2, :2]
             + self.dilated(a)  # 1x1, broadcast
             + F.avg_pool2d(a, 2))
        return self.head(a.amax(dim=(2, 3)))


#: Of the calls in _Pools.forward, those with a plain 2x2 window: plain, tuple_form,
#: subclass, the three functional ones with kernel 2 and stride 2.
_PLAIN_CALLS = 6


def test_only_plain_2x2_poolings_are_answered_and_only_inside_the_block() -> None:
    torch.manual_seed(0)
    model = _Pools()
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        ref = model(x)
        with _pooling.fast_max_pool() as pool:
            out = model(x)
        assert pool.calls == _PLAIN_CALLS
        assert torch.equal(out, ref)
        assert all("forward" not in vars(m) for m in model.modules())  # nothing patched
        model(x)
        assert pool.calls == _PLAIN_CALLS  # the block is over


def test_the_mode_is_this_threads_only() -> None:
    seen: list[int] = []

    def other_thread() -> None:
        with torch.no_grad():
            F.max_pool2d(torch.rand(1, 2, 4, 4), 2)
        seen.append(1)

    with torch.no_grad(), _pooling.fast_max_pool() as pool:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen == [1]
    assert pool.calls == 0


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = _pooling.max_pool_2x2

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(_pooling, "max_pool_2x2", counting)
    return calls


class _TutorialNet(nn.Module):
    """A tutorial-style CIFAR-10 network: one pooling module used twice, functional ReLUs,
    and a ``.view`` that fails in NHWC, so whylook runs it in NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = self.pool(x)  # after the layer (conv2): autograd records it
        return self.fc(x.view(-1, 8 * 4 * 4))


def test_a_pooling_before_the_layer_runs_without_indices_and_one_after_it_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    net = _TutorialNet()
    x, y = torch.rand(7, 3, 16, 16), [0, 1, 2, 3, 4, 0, 1]
    plain = grad_cam(net, "conv2", x, y, fuse=False, batch_size=4, return_features=True)
    calls = _count_calls(monkeypatch)
    fast = grad_cam(net, "conv2", x, y, fuse=True, batch_size=4, return_features=True)
    # Once per batch, before the layer; the second call of the same module, after the
    # layer, took torch's pooling, whose backward the gradient needs. (The plain pass
    # found that the ``.view`` needs NCHW, so this one starts there.)
    assert calls == [(4, 6, 16, 16), (3, 6, 16, 16)]
    np.testing.assert_array_equal(fast.saliency, plain.saliency)
    np.testing.assert_array_equal(fast.confidence, plain.confidence)
    assert plain.features is not None
    assert plain.features.shape == (7, 8, 8, 8)
    np.testing.assert_array_equal(fast.features, plain.features)
    assert fast.saliency.max() > 0
    assert "forward" not in vars(net.pool)
    feats = torch.cat(list(layer_features(net, "conv2", x, fuse=True, batch_size=4)))
    np.testing.assert_array_equal(feats.numpy(), plain.features)


def test_hooks_on_the_pooling_see_its_output_and_fuse_off_leaves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    net = _TutorialNet()
    seen: list[torch.Tensor] = []
    net.pool.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    x = torch.rand(2, 3, 16, 16)
    calls = _count_calls(monkeypatch)
    with GradCAM(net, "conv2", fuse=False):
        assert "forward" not in vars(net.pool)
    grad_cam(net, "conv2", x, [0, 1], fuse=False, channels_last=False)
    assert calls == []
    grad_cam(net, "conv2", x, [0, 1], fuse=True, channels_last=False)
    assert len(calls) == 1
    assert len(seen) == 4  # two calls per pass, each seen by the hook
    assert torch.equal(seen[0], seen[2])
    assert torch.equal(seen[1], seen[3])


def test_inputs_outside_the_fast_path_take_torchs_pooling() -> None:
    class Sub(torch.Tensor):
        pass

    unbatched = torch.rand(3, 6, 6)
    recorded = torch.rand(1, 3, 6, 6, requires_grad=True)
    subclassed = torch.rand(1, 3, 6, 6).as_subclass(Sub)
    tiny = torch.rand(1, 3, 1, 6)
    with _pooling.fast_max_pool() as pool:
        assert torch.equal(F.max_pool2d(unbatched, 2), torch.amax(
            unbatched.reshape(3, 3, 2, 3, 2), dim=(2, 4)))
        out = F.max_pool2d(recorded, 2)
        out.sum().backward()  # torch's pooling, with its backward
        assert recorded.grad is not None
        assert float(recorded.grad.sum()) == out.numel()
        F.max_pool2d(subclassed, 2)
        with pytest.raises(RuntimeError):  # torch's own error for a window too large
            F.max_pool2d(tiny, 2)
        assert pool.calls == 0
        with torch.no_grad():
            F.max_pool2d(recorded, 2)
        assert pool.calls == 1
