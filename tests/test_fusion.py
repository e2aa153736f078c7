"""Convolution + ReLU fused on CPU: the same values as the plain pass, the model put back."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from whylook import _fusion
from whylook.errors import WhylookError
from whylook.models import build_model
from whylook.saliency import GradCAM, grad_cam, layer_features

needs_kernel = pytest.mark.skipif(
    _fusion._kernel() is None, reason="this torch build has no oneDNN convolution kernel"
)


def _smallcnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("smallcnn", num_classes=10, in_channels=1, image_size=28)


def _images(n: int = 12) -> torch.Tensor:
    # Digit-like: mostly zeros with bright strokes, as the ReLUs see on MNIST.
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(n, 1, 28, 28, generator=gen)
    return torch.where(x > 0.7, x, torch.zeros(()))


def _vgg_like() -> nn.Sequential:
    """Conv-ReLU pairs before the layer (index 3) and after it."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),          # 0, 1: fused
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),                      # 2, 3: 3 is the layer
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),           # 4, 5: after the layer
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_pass_equals_plain_pass_on_smallcnn(channels_last: bool) -> None:
    model = _smallcnn()
    x, y = _images(), torch.arange(12) % 10
    plain = grad_cam(model, "block3", x, y, fuse=False, channels_last=channels_last,
                     return_features=True)
    fused = grad_cam(model, "block3", x, y, fuse=True, channels_last=channels_last,
                     return_features=True)
    assert float(plain.saliency.max()) > 0  # not a comparison of zeros
    np.testing.assert_allclose(fused.saliency, plain.saliency, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused.confidence, plain.confidence, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused.features, plain.features, rtol=1e-4, atol=1e-5)
    feats = torch.cat(list(layer_features(model, "block3", x, fuse=True, batch_size=5)))
    np.testing.assert_allclose(feats.numpy(), plain.features, rtol=1e-4, atol=1e-5)


@pytest.fixture
def pairs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs in oneDNN's blocked layout off: what is left is the fused pairs."""
    monkeypatch.setattr(_fusion, "_blocked_available", lambda: False)


def _count_blocked(monkeypatch: pytest.MonkeyPatch,
                   back: list[int] | None = None) -> dict[str, int]:
    """Count the convolutions run on blocked tensors (alone, or as the kernel with the
    ReLU as its post-op) and the conversions into them (and, into ``back``, the
    conversions out of them)."""
    counts = {"conv": 0, "to_mkldnn": 0}
    conv, to_mkldnn, to_dense = torch.mkldnn_convolution, torch.Tensor.to_mkldnn, \
        torch.Tensor.to_dense
    kernel = _fusion._kernel()

    def counting_conv(*args: object) -> torch.Tensor:
        counts["conv"] += 1
        return conv(*args)  # type: ignore[arg-type]

    def counting_kernel(x: torch.Tensor, *args: object) -> torch.Tensor:
        assert kernel is not None
        counts["conv"] += x.is_mkldnn
        return kernel(x, *args)

    inside: list[int] = []

    def counting_to_mkldnn(self: torch.Tensor, *args: object) -> torch.Tensor:
        # whylook's pooling mode (a TorchFunctionMode) hands the method back to this wrapper.
        counts["to_mkldnn"] += not inside
        inside.append(1)
        try:
            return to_mkldnn(self, *args)  # type: ignore[arg-type]
        finally:
            inside.pop()

    def counting_to_dense(self: torch.Tensor, *args: object) -> torch.Tensor:
        if back is not None and self.layout == torch._mkldnn and not inside:  # type: ignore[attr-defined]
            back.append(1)
        inside.append(1)
        try:
            return to_dense(self, *args)  # type: ignore[arg-type]
        finally:
            inside.pop()

    monkeypatch.setattr(torch, "mkldnn_convolution", counting_conv)
    if kernel is not None:
        monkeypatch.setattr(_fusion, "_kernel", lambda: counting_kernel)
    monkeypatch.setattr(torch.Tensor, "to_mkldnn", counting_to_mkldnn)
    monkeypatch.setattr(torch.Tensor, "to_dense", counting_to_dense)
    return counts


def _unpatched(model: nn.Module) -> bool:
    return all("forward" not in vars(m) for m in model.modules())


@needs_kernel
def test_containers_run_fused_inside_the_block_and_are_put_back() -> None:
    model = _smallcnn()
    entries = [list(m.named_children()) for m in model.modules()]
    keys = list(model.state_dict())
    with GradCAM(model, "block3", fuse=True) as cam:
        # The model (an nn.Sequential: its run goes through block1 and block2), block1,
        # block2 and block3 (inside the layer, before its hook) run fused; their entries
        # stay the model's own modules.
        assert [name for name, m in model.named_modules() if "forward" in vars(m)] == [
            "", "block1", "block2", "block3"]
        assert [list(m.named_children()) for m in model.modules()] == entries
        cam(_images(3), [0, 1, 2])
    assert _unpatched(model)
    assert [list(m.named_children()) for m in model.modules()] == entries
    assert list(model.state_dict()) == keys


@needs_kernel
def test_put_back_after_an_error_inside_the_block() -> None:
    model = _smallcnn()
    patched_inside: list[bool] = []

    def use_then_fail() -> None:
        with GradCAM(model, "block3", fuse=True):
            patched_inside.append(not _unpatched(model))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        use_then_fail()
    assert patched_inside == [True]
    assert _unpatched(model)


@needs_kernel
@pytest.mark.usefixtures("pairs_only")
def test_layer_and_pairs_after_it_keep_their_gradients() -> None:
    """The layer (a ReLU) is never fused; the pair after it runs unfused for the backward."""
    captum_attr = pytest.importorskip("captum.attr")
    model = _vgg_like().eval()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 2, 1])
    calls: list[int] = []
    real = _fusion._kernel()
    assert real is not None

    def counting(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fusion, "_kernel", lambda: counting)
        grad_cam(model, "3", x, y, fuse=True, batch_size=4)
    assert len(calls) == 1  # (0, 1) only: (2, 3) holds the layer, (4, 5) needs gradients
    ref = captum_attr.LayerGradCam(model, model[3]).attribute(x, target=y, relu_attributions=True)
    ref = ref.detach()
    fused = grad_cam(model, "3", x, y, fuse=True)
    assert float(ref.abs().max()) > 1e-4
    np.testing.assert_allclose(fused.saliency, ref[:, 0].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(fused.saliency, grad_cam(model, "3", x, y, fuse=False).saliency)


@needs_kernel
def test_hooked_modules_and_other_containers_are_left_alone() -> None:
    model = _vgg_like()
    seen: list[torch.Size] = []
    model[0].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    grad_cam(model, "3", torch.rand(2, 3, 12, 12), [0, 1], fuse=True)
    assert seen == [torch.Size([2, 8, 12, 12])]  # the hooked convolution ran on its own
    model = _vgg_like()
    model[1].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    grad_cam(model, "3", torch.rand(2, 3, 12, 12), [0, 1], fuse=True)
    assert len(seen) == 2  # so did the hooked ReLU, its hook called

    class Shared(nn.Module):  # the ReLU of the pair is also called outside its container
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.body(x)
            return self.head(self.body[1](a.mean(dim=(2, 3)) - 0.1))

    net = Shared()
    x = torch.rand(3, 1, 6, 6)
    plain = grad_cam(net, "body", x, [0, 1, 2], fuse=False)
    fused = grad_cam(net, "body", x, [0, 1, 2], fuse=True)
    np.testing.assert_allclose(fused.saliency, plain.saliency, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused.confidence, plain.confidence, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_a_kernel_that_fails_falls_back_to_the_plain_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[int] = []

    def refuse(*_args: object) -> torch.Tensor:
        tried.append(1)
        raise RuntimeError("oneDNN: unsupported")

    model = _smallcnn()
    x, y = _images(4), [1, 2, 3, 4]
    plain = grad_cam(model, "block3", x, y, fuse=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fusion, "_blocked_available", lambda: False)
        pairs = grad_cam(model, "block3", x, y, fuse=True)
    # Blocked runs that fail (smallcnn's convolutions, each before a ReLU, run as the
    # kernel with the ReLU as its post-op): the pairs from then on, their values exactly.
    kernel = _fusion._kernel()
    assert kernel is not None

    def refuse_blocked(x: torch.Tensor, *args: object) -> torch.Tensor:
        if x.is_mkldnn:
            return refuse()
        return kernel(x, *args)

    monkeypatch.setattr(torch, "mkldnn_convolution", refuse)
    monkeypatch.setattr(_fusion, "_kernel", lambda: refuse_blocked)
    np.testing.assert_array_equal(grad_cam(model, "block3", x, y, fuse=True).saliency,
                                  pairs.saliency)
    assert tried == [1]  # tried once, then not again in that pass
    # And pairs that fail too: the plain pass, its values exactly.
    monkeypatch.setattr(_fusion, "_kernel", lambda: refuse)
    fused = grad_cam(model, "block3", x, y, fuse=True)
    np.testing.assert_array_equal(fused.saliency, plain.saliency)


def test_fuse_off_and_unavailable_models_touch_nothing() -> None:
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the caller turned oneDNN off
    try:
        assert not _fusion.available(_smallcnn())
    finally:
        torch.backends.mkldnn.enabled = enabled
    model = _smallcnn().double()
    assert not _fusion.available(model)
    with _fusion.fused_conv_relu(model) as count:
        assert count == 0
        assert _unpatched(model)
    with GradCAM(_smallcnn(), "block3", fuse=False) as cam:
        assert _unpatched(cam.model)
    with pytest.raises(Exception, match="fuse must be True, False or None"):
        grad_cam(model, "block3", _images(2).double(), [0, 1], fuse="yes")  # type: ignore[arg-type]


@needs_kernel
@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 8, 3, bias=False),
    nn.Conv2d(4, 8, 3, groups=4, padding=1),
    nn.Conv2d(4, 8, (3, 5), padding=(1, 2), stride=(2, 1), dilation=(1, 2)),
    nn.Conv2d(4, 4, 1),
], ids=["no-bias", "grouped", "strided-dilated", "1x1"])
@pytest.mark.parametrize("nhwc_weights", [False, True])
@pytest.mark.parametrize("nhwc_input", [False, True])
@pytest.mark.parametrize("blocked", [False, True], ids=["pair", "blocked"])
def test_convolution_variants_and_layouts(conv: nn.Conv2d, nhwc_weights: bool,
                                          nhwc_input: bool, blocked: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    conv = copy.deepcopy(conv)  # the parameters are shared between the cases
    net = nn.Sequential(conv, nn.ReLU())
    if nhwc_weights:
        net.to(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 11, 13)
    if nhwc_input:
        x = x.contiguous(memory_format=torch.channels_last)
    counts = _count_blocked(monkeypatch)
    real = _fusion._kernel()  # the counting one
    assert real is not None
    fused: list[int] = []

    def kernel(*args: object) -> torch.Tensor:
        out = real(*args)
        fused.append(1)  # counted once it ran: a kernel that raises falls back unfused
        return out

    if not blocked:
        monkeypatch.setattr(_fusion, "_blocked_available", lambda: False)
    with torch.no_grad():
        ref = torch.relu(conv(x))
        counts["conv"] = 0
        monkeypatch.setattr(_fusion, "_kernel", lambda: kernel)
        with _fusion.fused_conv_relu(net) as count:
            out = net(x)
    assert count == 1
    # The fused kernel gave the output, on blocked tensors or not; not the plain path.
    assert (fused, counts["conv"]) == ([1], 1 if blocked else 0)
    assert out.shape == ref.shape
    assert float(ref.max()) > 0
    assert out.is_contiguous() == ref.is_contiguous()  # the layout eager torch would give
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _counting_kernel(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Record the input dtype of every fused call (the real kernel still runs)."""
    real = _fusion._kernel()
    assert real is not None
    dtypes: list[torch.dtype] = []

    def kernel(x: torch.Tensor, *args: object) -> torch.Tensor:
        dtypes.append(x.dtype)
        return real(x, *args)

    monkeypatch.setattr(_fusion, "_kernel", lambda: kernel)
    return dtypes


@needs_kernel
def test_bfloat16_pass_runs_fused_in_bfloat16_with_the_same_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """precision="bfloat16": the pairs before the layer run fused, in bfloat16, and give
    what autocast's own convolution and ReLU give, bit for bit on smallcnn."""
    model = _smallcnn()
    x, y = _images(), torch.arange(12) % 10
    plain = grad_cam(model, "block3", x, y, fuse=False, precision="bfloat16",
                     return_features=True)
    dtypes = _counting_kernel(monkeypatch)
    fused = grad_cam(model, "block3", x, y, fuse=True, precision="bfloat16",
                     return_features=True)
    # The four pairs of block1-3 (block3's inside the layer, before its hook), one batch.
    assert dtypes == [torch.bfloat16] * 4
    assert float(plain.saliency.max()) > 0
    np.testing.assert_array_equal(fused.features, plain.features)
    np.testing.assert_array_equal(fused.saliency, plain.saliency)
    np.testing.assert_array_equal(fused.confidence, plain.confidence)


@needs_kernel
def test_other_autocast_dtypes_are_left_to_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a caller's float16 autocast nothing is fused: the fused kernel would run the
    convolutions in float32 behind autocast's back."""
    model = _smallcnn()
    dtypes = _counting_kernel(monkeypatch)
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad(), \
            _fusion.fused_conv_relu(model, keep=(model.block3,)):
        out = model(_images(2))
    assert dtypes == []
    assert out.dtype == torch.float16


# ----------------------------------------------------------------- oneDNN's blocked layout


@needs_kernel
def test_smallcnn_runs_blocked_with_one_conversion_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """block1 and block2 run as one run of the model's (an nn.Sequential), which calls the
    layer block3 on its blocked output; block3's own run hands back its output as an
    ordinary tensor: each batch is converted once each way."""
    model = _smallcnn()
    x, y = _images(), torch.arange(12) % 10
    plain = grad_cam(model, "block3", x, y, fuse=False, return_features=True)
    back: list[int] = []
    counts = _count_blocked(monkeypatch, back)
    blocked = grad_cam(model, "block3", x, y, fuse=True, return_features=True, batch_size=5)
    assert counts == {"conv": 4 * 3, "to_mkldnn": 3}  # 3 batches
    assert len(back) == 3
    assert float(plain.saliency.max()) > 0
    np.testing.assert_allclose(blocked.saliency, plain.saliency, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(blocked.confidence, plain.confidence, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(blocked.features, plain.features, rtol=1e-4, atol=1e-5)
    feats = torch.cat(list(layer_features(model, "block3", x, fuse=True, batch_size=5)))
    np.testing.assert_allclose(feats.numpy(), plain.features, rtol=1e-4, atol=1e-5)


def _layouts_after_the_layer(model: nn.Module) -> list[str]:
    """Record the layout of what ``model.pool`` (smallcnn's module after its layer) gets."""
    seen: list[str] = []

    def record(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        seen.append("NHWC" if x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous() else "NCHW" if x.is_contiguous() else "other")

    model.pool.register_forward_pre_hook(record)
    return seen


@needs_kernel
@pytest.mark.parametrize("channels_last", [True, False], ids=["NHWC", "NCHW"])
def test_the_layer_output_reaches_the_network_in_eager_layout_with_one_copy(
    channels_last: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """block3's run hands its output to whylook's hook as it leaves oneDNN (NCHW); the
    network after the layer gets it in the layout eager torch gives, in one copy that also
    keeps the stored A apart from what the network does to it in place."""
    model = _smallcnn()
    x, y = _images(6), torch.arange(6) % 10
    plain = grad_cam(model, "block3", x, y, fuse=False, return_features=True,
                     channels_last=channels_last)
    # An in-place step right after the layer: it must reach the logits, not A.
    model.pool.register_forward_pre_hook(lambda _m, i: (i[0].mul_(2.0),))
    doubled = grad_cam(model, "block3", x, y, fuse=False, return_features=True,
                       channels_last=channels_last)
    seen = _layouts_after_the_layer(model)
    copies: list[torch.Size] = []
    clone, contiguous = torch.Tensor.clone, torch.Tensor.contiguous
    inside: list[int] = []  # whylook's pooling mode hands a method back to its wrapper

    def counted(method: Any) -> Any:
        def call(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            inside.append(1)
            try:
                out = method(t, *args, **kwargs)
            finally:
                inside.pop()
            if out is not t and t.shape[1:] == (64, 7, 7) and not inside:
                copies.append(t.shape)
            return out
        return call

    monkeypatch.setattr(torch.Tensor, "clone", counted(clone))
    monkeypatch.setattr(torch.Tensor, "contiguous", counted(contiguous))
    fused = grad_cam(model, "block3", x, y, fuse=True, channels_last=channels_last)
    assert seen == ["NHWC" if channels_last else "NCHW"]
    assert copies == [torch.Size([6, 64, 7, 7])]  # to_dense's output, copied once
    assert not np.allclose(doubled.confidence, plain.confidence)  # the doubling counts
    np.testing.assert_allclose(fused.confidence, doubled.confidence, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fused.saliency, doubled.saliency, rtol=1e-4, atol=1e-5)
    # The features (A) come out as eager gives them too, unchanged by the doubling.
    del copies[:]
    for fuse in (False, True):
        cam = GradCAM(model, "block3", fuse=fuse, channels_last=channels_last)
        ((_, feats),) = cam.batches_with_features(x, y)
        np.testing.assert_allclose(feats.numpy(), plain.features, rtol=1e-4, atol=1e-5)
        assert feats.is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_kernel
def test_features_and_the_callers_own_forward_get_the_eager_layout() -> None:
    """Without whylook's gradient pass the layer's output still leaves in eager's layout:
    the features of ``layer_features`` and what a forward of the caller's own inside the
    ``with`` block hands on (the hook leaves that forward's values alone)."""
    model = _smallcnn()
    x = _images(4)
    with torch.no_grad():
        ref = model(x)
    feats = next(iter(layer_features(model, "block3", x, fuse=True)))
    assert feats.is_contiguous(memory_format=torch.channels_last)
    seen = _layouts_after_the_layer(model)
    with GradCAM(model, "block3", fuse=True) as cam, torch.no_grad():
        cam(x, [0, 1, 2, 3])
        del seen[:]
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert seen == ["NHWC"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("channels", [1, 8])
def test_a_layer_output_that_is_both_layouts_keeps_eagers_strides(channels: int) -> None:
    """With one channel, or a 1x1 map, NCHW and NHWC hold the same bytes: the network
    then gets the strides eager gives (a `.view` after it works as without whylook)."""
    torch.manual_seed(7)
    size = 10 if channels == 1 else 2
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, channels, 3, padding=1), nn.ReLU()),
        nn.Conv2d(channels, 4, 1), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.rand(2, 3, size, size)
    model(x)  # the lazy layer's shape
    strides: list[tuple[int, ...]] = []
    model[2].register_forward_pre_hook(lambda _m, i: strides.append(i[0].stride()))
    plain = grad_cam(model, "1", x, [0, 2], fuse=False)
    fused = grad_cam(model, "1", x, [0, 2], fuse=True)
    assert strides[0] == strides[1]
    np.testing.assert_allclose(fused.saliency, plain.saliency, rtol=1e-4, atol=1e-6)


@needs_kernel
def test_an_empty_batch_inside_the_block_runs_as_torch_runs_it() -> None:
    model = _smallcnn()
    with GradCAM(model, "block3", fuse=True), torch.no_grad():
        assert model(torch.rand(0, 1, 28, 28)).shape == (0, 10)


@needs_kernel
def test_blocked_runs_stop_at_the_layer_and_before_the_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    model = _vgg_like().eval()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 4, 2, 1])
    counts = _count_blocked(monkeypatch)
    fused = grad_cam(model, "3", x, y, fuse=True)
    # Convolutions 0 and 2 (the layer 3 is a ReLU of its own); 4 is after the layer.
    assert counts["conv"] == 2
    ref = captum_attr.LayerGradCam(model, model[3]).attribute(x, target=y, relu_attributions=True)
    ref = ref.detach()
    assert float(ref.abs().max()) > 1e-4
    np.testing.assert_allclose(fused.saliency, ref[:, 0].numpy(), rtol=1e-4, atol=1e-6)


def _plain_then_fused(net: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """``net(x)`` plain and inside ``fused_conv_relu``, with the blocked counts of the
    second."""
    with torch.no_grad():
        ref = net(x)
        counts = _count_blocked(monkeypatch)
        with _fusion.fused_conv_relu(net):
            out = net(x)
    return ref, out, counts


@needs_kernel
@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.MaxPool2d((2, 3), stride=(1, 2)),
], ids=["2x2", "3x3-padded-ceil", "rectangular"])
def test_relu_then_pooling_gives_the_plain_values(pool: nn.MaxPool2d,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A ReLU right before a max-pooling runs after it on blocked tensors: the same values."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), pool,
                        nn.Conv2d(16, 16, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)).eval()
    ref, out, counts = _plain_then_fused(net, torch.randn(2, 3, 15, 17), monkeypatch)
    assert counts == {"conv": 2, "to_mkldnn": 1}
    assert float(ref.max()) > 0
    assert float((ref == 0).float().mean()) > 0.05  # the ReLUs at work
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_relu_after_a_pooling_runs_after_the_next_pooling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ReLU that follows no convolution (so no kernel's post-op), right before a
    max-pooling, runs after it; a convolution with no ReLU after it runs alone."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.MaxPool2d(2, stride=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(16, 8, 3)).eval()
    with torch.no_grad():
        net[0].bias.fill_(-1.5)  # so that the ReLU has work after two poolings
    x = torch.randn(2, 3, 15, 17)
    relus: list[torch.Size] = []
    relu_ = torch.relu_

    def recording_relu_(t: torch.Tensor) -> torch.Tensor:
        relus.append(t.shape)
        return relu_(t)

    monkeypatch.setattr(torch, "relu_", recording_relu_)
    ref, out, counts = _plain_then_fused(net, x, monkeypatch)
    assert counts == {"conv": 2, "to_mkldnn": 1}
    assert relus == [torch.Size([2, 16, 7, 8])]  # after the second pooling
    assert float((ref == 0).float().mean()) < 0.05  # no ReLU after the last convolution
    with torch.no_grad():
        assert float((net[:4](x) == 0).float().mean()) > 0.05
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_pooling_onednn_cannot_run_stays_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2, dilation=2),
                        nn.Conv2d(8, 8, 3)).eval()
    ref, out, counts = _plain_then_fused(net, torch.randn(2, 3, 16, 16), monkeypatch)
    assert counts == {"conv": 2, "to_mkldnn": 2}  # (0, 1), the dilated pooling, (3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class _TwoBlocks(nn.Module):
    """Blocks with the caller's code between them: in-place, or reading the output twice."""

    def __init__(self, between: str) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.between = between
        self.b1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.b1(x)
        if self.between == "in-place":
            a.mul_(-1.0).add_(0.5)
        elif self.between == "through .data":
            a.data.mul_(-1.0)  # a write no version counter sees
        elif self.between == "nan":
            a = a / (a - a)  # 0/0: NaN wherever nothing else is
        b = self.b2(a)
        if self.between == "reuse":
            b = b + a.mean(dim=1, keepdim=True)
        return self.head(b.mean(dim=(2, 3)))


@needs_kernel
@pytest.mark.parametrize("between", ["in-place", "through .data", "reuse"])
def test_what_the_caller_does_between_blocks_is_seen(
    between: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller's code between two containers gets an ordinary tensor, and the next
    container converts what it gets: whatever was done to it in between counts."""
    model = _TwoBlocks(between).eval()
    x, y = _images(4)[:, :, :12, :12], [0, 1, 2, 0]
    plain = grad_cam(model, "b2", x, y, fuse=False)
    counts = _count_blocked(monkeypatch)
    fused = grad_cam(model, "b2", x, y, fuse=True)
    assert counts == {"conv": 2, "to_mkldnn": 2}
    assert float(plain.saliency.max()) > 0
    np.testing.assert_allclose(fused.saliency, plain.saliency, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fused.confidence, plain.confidence, rtol=1e-4, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("blocked", [False, True], ids=["pairs", "blocked"])
@pytest.mark.parametrize("where", ["pixels", "weights", "between blocks"])
def test_nan_is_never_dropped_by_onednn(where: str, blocked: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's ReLU turns NaN into 0 and its pooling drops NaN, so a NaN pixel, a NaN
    weight or a NaN made between blocks would give finite logits; they run plain, and the
    NaN reaches the logits, which are refused."""
    if not blocked:
        monkeypatch.setattr(_fusion, "_blocked_available", lambda: False)
    model = _TwoBlocks("nan" if where == "between blocks" else "none").eval()
    x = _images(2)[:, :, :12, :12].clone()
    if where == "pixels":
        x[0, 0, 5, 5] = float("nan")
    elif where == "weights":
        with torch.no_grad():
            model.b1[0].weight[3, 0, 1, 1] = float("nan")
    with pytest.raises(WhylookError, match="returned NaN or infinite logits"):
        grad_cam(model, "b2", x, [0, 1], fuse=True)
    # Without the guard oneDNN's kernels would have given finite logits here.
    if where == "pixels":
        x = torch.nan_to_num(x, nan=0.0)
        grad_cam(model, "b2", x, [0, 1], fuse=True)


class _Doubled(nn.Sequential):
    """A container with a forward of its own: its entries are not simply run in order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


@needs_kernel
@pytest.mark.parametrize("inner", ["plain", "hooked", "batchnorm", "own forward"])
def test_runs_go_through_nested_containers_that_only_run_their_entries(
    inner: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(5)
    first: nn.Sequential = (_Doubled if inner == "own forward" else nn.Sequential)(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    if inner == "batchnorm":
        first.append(nn.BatchNorm2d(8))
    seen: list[torch.layout] = []
    if inner == "hooked":
        first.register_forward_hook(lambda _m, _i, out: seen.append(out.layout))
    net = nn.Sequential(first, nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
        seen.clear()
        counts = _count_blocked(monkeypatch)
        with _fusion.fused_conv_relu(net):
            out = net(x)
    # Through the plain container: one run, one conversion; else one run per container,
    # each converting. A container with a forward of its own is the user's code: nothing
    # in it is touched.
    assert counts == {"conv": 1 if inner == "own forward" else 2,
                      "to_mkldnn": 1 if inner in ("plain", "own forward") else 2}
    assert seen == ([torch.strided] if inner == "hooked" else [])  # the hook saw a tensor
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_a_layer_hooked_by_the_caller_gets_an_ordinary_input(
    hook: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _smallcnn()
    x, y = _images(4), [0, 1, 2, 3]
    plain = grad_cam(model, "block3", x, y, fuse=False)
    layouts: list[torch.layout] = []
    if hook == "forward":
        model.block3.register_forward_hook(lambda _m, i, _o: layouts.append(i[0].layout))
    else:
        model.block3.register_forward_pre_hook(lambda _m, i: layouts.append(i[0].layout))
    back: list[int] = []
    counts = _count_blocked(monkeypatch, back)
    fused = grad_cam(model, "block3", x, y, fuse=True)
    assert layouts == [torch.strided]
    # block2's output is made ordinary for the layer, whose run converts it again.
    assert counts == {"conv": 4, "to_mkldnn": 2}
    assert len(back) == 2
    np.testing.assert_allclose(fused.saliency, plain.saliency, rtol=1e-4, atol=1e-5)


def _layered(kernel: int = 3) -> nn.Sequential:
    """A block of two convolutions, then the layer (a container oneDNN can run, taking the
    block's blocked output), then a head."""
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, kernel, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@needs_kernel
@pytest.mark.parametrize("case", ["nan weight", "huge weights", "kernel too large"])
def test_the_layer_and_its_block_fail_as_the_plain_pass_does(case: str) -> None:
    """When the layer's run cannot run blocked, the layer still runs (plain), so the pass
    fails as the plain pass does, never with the layer's input for its output."""
    model = _layered(kernel=7 if case == "kernel too large" else 3)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if case == "nan weight":
            model[1][0].weight[0, 0, 0, 0] = float("nan")
        elif case == "huge weights":
            # Finite, but past float32's range at the second convolution, where inf - inf
            # makes NaN, which oneDNN's ReLU would turn into 0.
            model[0][0].weight.mul_(1e30)
            model[0][2].weight.mul_(1e30)
    for fuse in (False, True):
        with pytest.raises(WhylookError) as err:
            grad_cam(model, "1", x, [0, 1], fuse=fuse)
        assert ("NaN or infinite logits" if case != "kernel too large"
                else "the model failed on input") in str(err.value)


@needs_kernel
def test_weights_changed_through_data_during_the_block_are_checked_again() -> None:
    model = _layered()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with GradCAM(model, "1") as cam:
        cam(x, [0, 1])
        model[0][0].weight.data[0, 0, 0, 0] = float("nan")  # as a manual weight load would
        with pytest.raises(WhylookError, match="NaN or infinite logits"):
            cam(x, [0, 1])


@needs_kernel
def test_features_under_the_callers_inference_mode() -> None:
    model = _layered()
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fused = torch.cat(list(layer_features(model, "1", x, batch_size=2)))
        plain = torch.cat(list(layer_features(model, "1", x, batch_size=2, fuse=False)))
    assert float(plain.max()) > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_pooling_padding_torch_refuses_is_left_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, padding=2)).eval()
    counts = _count_blocked(monkeypatch)
    with torch.no_grad(), _fusion.fused_conv_relu(net), \
            pytest.raises(RuntimeError, match="pad should be at most half"):
        net(torch.randn(2, 3, 9, 9))
    assert counts["conv"] == 1  # the run stopped before the pooling
