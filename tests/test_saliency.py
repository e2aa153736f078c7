"""Step 2: raw Grad-CAM — hand-computed values, Captum agreement, and model restoration."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from whylook.errors import WhylookError
from whylook.saliency import (
    GradCAM,
    SaliencyResult,
    grad_cam,
    layer_features,
    layer_output_shape,
)

# A 1x4x4 image (scaled by 1/4 so it lies in [0, 1]) with asymmetric 2x2 blocks:
#   [[1, 0, 2, 0],
#    [0, 3, 0, 1],
#    [4, 0, 0, 2],
#    [0, 1, 3, 0]] / 4
_X = (
    torch.tensor(
        [[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 1.0], [4.0, 0.0, 0.0, 2.0], [0.0, 1.0, 3.0, 0.0]]
    ).reshape(1, 1, 4, 4)
    / 4.0
)
_W = [[1.0, 2.0], [-1.0, 3.0], [0.5, -4.0]]  # linear layer: 2 channels -> 3 classes


def _tiny_model() -> nn.Sequential:
    """conv 2x2 stride 2 (no bias) -> 2 channels on a 2x2 grid -> GAP -> linear (no bias).

    Channel 0 sums each 2x2 block; channel 1 is (top-left - bottom-right) of each block.
    """
    conv = nn.Conv2d(1, 2, kernel_size=2, stride=2, bias=False)
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, -1.0]]]]))
        lin.weight.copy_(torch.tensor(_W))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)


# Hand computation (blocks of 4*_X: TL [[1,0],[0,3]], TR [[2,0],[0,1]],
# BL [[4,0],[0,1]], BR [[0,2],[3,0]]):
#   A0 = block sums / 4        = [[4, 3], [5, 5]] / 4 = [[1, .75], [1.25, 1.25]]
#   A1 = (TL - BR) / 4         = [[-2, 1], [3, 0]] / 4 = [[-.5, .25], [.75, 0]]
#   logit_y = sum_c W[y,c] * mean(A_c);  d logit_y / d A_c[i,j] = W[y,c] / 4
#   => alpha_c = W[y,c] / 4 and I_y = ReLU(sum_c W[y,c]/4 * A_c)
# Class 0 (W = [1, 2]):   (A0 + 2 A1) / 4 = [[0, 1.25], [2.75, 1.25]] / 4
_CAM_CLASS0 = [[0.0, 0.3125], [0.6875, 0.3125]]
# Class 2 (W = [.5, -4]): (.5 A0 - 4 A1) / 4 = [[2.5, -.625], [-2.375, .625]] / 4,
# and the ReLU clips the two negative cells.
_CAM_CLASS2 = [[0.625, 0.0], [0.0, 0.15625]]
# GAP: mean(A0) = 17/16, mean(A1) = 2/16 -> logits W @ (17/16, 1/8).
_LOGITS = [17 / 16 + 2 / 8, -17 / 16 + 3 / 8, 0.5 * 17 / 16 - 4 / 8]


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_hand_computed_values_and_relu() -> None:
    images = _X.repeat(2, 1, 1, 1)
    res = grad_cam(_tiny_model(), "0", images, [0, 2], return_features=True)
    assert res.saliency.dtype == np.float32
    assert res.saliency.shape == (2, 2, 2)
    np.testing.assert_allclose(res.saliency[0], _CAM_CLASS0, atol=1e-6)
    np.testing.assert_allclose(res.saliency[1], _CAM_CLASS2, atol=1e-6)
    np.testing.assert_allclose(res.confidence, [_softmax(_LOGITS)] * 2, atol=1e-6)
    assert res.features is not None
    np.testing.assert_allclose(
        res.features[0], [[[1, 0.75], [1.25, 1.25]], [[-0.5, 0.25], [0.75, 0]]], atol=1e-6
    )


def test_no_rescaling_and_batch_independence() -> None:
    """Raw values scale with the image (no per-image normalisation), and batch size
    does not change the result (the summed backward is per-sample exact)."""
    images = torch.cat([_X, 0.5 * _X, _X])
    labels = [0, 0, 2]
    full = grad_cam(_tiny_model(), "0", images, labels, batch_size=3)
    single = grad_cam(_tiny_model(), "0", images, labels, batch_size=1)
    np.testing.assert_allclose(full.saliency, single.saliency, atol=1e-7)
    # Linear model: halving the image halves both A and nothing else.
    np.testing.assert_allclose(full.saliency[1], 0.5 * np.array(_CAM_CLASS0), atol=1e-6)


def test_uint8_numpy_input_is_scaled() -> None:
    # 4*_X holds the integers 0..4; times 51 is exact in uint8 and /255 gives 0.8 * _X,
    # so the (linear) map is 0.8 times the hand-computed one.
    images = (4 * _X * 51).to(torch.uint8).numpy()
    res = grad_cam(_tiny_model(), "0", images, np.array([0]))
    np.testing.assert_allclose(res.saliency[0], 0.8 * np.array(_CAM_CLASS0), atol=1e-6)


def _resnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.mark.parametrize("layer", ["layer2", "layer3.1.bn2"])
def test_matches_captum_layer_gradcam(layer: str) -> None:
    """layer3.1.bn2 is followed by an in-place ``out += identity``."""
    captum_attr = pytest.importorskip("captum.attr")
    model = _resnet()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 3, 9, 3, 5, 1])
    module = dict(model.named_modules())[layer]
    ref = captum_attr.LayerGradCam(model, module).attribute(x, target=y, relu_attributions=True)
    ref = ref.detach()
    ours = grad_cam(model, layer, x, y, batch_size=4)
    assert ours.saliency.shape == tuple(ref.shape[:1]) + tuple(ref.shape[2:])
    assert float(ref.abs().max()) > 1e-4  # the comparison is not between zeros
    np.testing.assert_allclose(ours.saliency, ref[:, 0].numpy(), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(ours.confidence, probs, atol=1e-6)


def _state(model: nn.Module) -> tuple[list[bool], list[bool], int]:
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        hooks,
    )


def test_restores_mode_grad_flags_and_hooks() -> None:
    model = _resnet().train()
    model.layer1.eval()  # mixed modes must come back exactly
    model.conv1.weight.requires_grad_(False)
    before = _state(model)
    x = torch.rand(3, 3, 32, 32)
    grad_cam(model, model.layer3, x, [1, 2, 3])
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients
    # Eval mode was used: same result as an explicit eval-mode model.
    a = grad_cam(model, "layer3", x, [1, 2, 3]).saliency
    b = grad_cam(model.eval(), "layer3", x, [1, 2, 3]).saliency
    np.testing.assert_array_equal(a, b)


def test_restores_after_exception_inside_context() -> None:
    model = _resnet().train()
    before = _state(model)

    def use_then_fail() -> None:
        with GradCAM(model, "layer3") as cam:
            cam(torch.rand(2, 3, 32, 32), [0, 1])
            assert _state(model) != before  # hook in place, eval mode, frozen parameters
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        use_then_fail()
    assert _state(model) == before


def test_restores_after_error_during_forward() -> None:
    model = _resnet().train()
    before = _state(model)
    with pytest.raises(WhylookError, match="out of range"):
        grad_cam(model, "layer3", torch.rand(2, 3, 32, 32), [0, 10])
    assert _state(model) == before

    class Exploding(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("explodes after the layer")

    model.fc = Exploding()
    # One line with the model's own message (no hint about images: it is not about them),
    # and the original error kept as the cause for debugging.
    with pytest.raises(WhylookError) as info:
        grad_cam(model, "layer3", torch.rand(2, 3, 32, 32), [0, 1])
    assert str(info.value) == ("the model failed on input of shape (2, 3, 32, 32): explodes "
                               "after the layer")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_out_of_memory_says_to_lower_the_batch_size() -> None:
    class Hungry(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # torch's own wording, whose advice names max_split_size_mb: not about images.
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. "
                                         "If reserved memory is >> allocated memory try "
                                         "setting max_split_size_mb")

    model = _tiny_model()
    model[1] = Hungry()
    with pytest.raises(WhylookError) as info:
        grad_cam(model, "0", _X, [0])
    assert str(info.value).endswith("; use a smaller batch size (--batch-size, or "
                                    "batch_size=...)")
    assert "channels and size" not in str(info.value)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_caller_no_grad_context_is_overridden(context: Any) -> None:
    model = _tiny_model()
    with context():
        # Inputs made inside the caller's context too (inference tensors there).
        res = grad_cam(model, "0", _X.clone(), [0])
        feats = next(iter(layer_features(model, "0", _X.clone())))
    np.testing.assert_allclose(res.saliency[0], _CAM_CLASS0, atol=1e-6)
    assert feats.shape == (1, 2, 2, 2)


@pytest.mark.parametrize("wrap", [lambda z, a: (z, a), lambda z, a: {"logits": z},
                                  lambda z, a: z[:, :, None]], ids=["tuple", "dict", "3-d"])
def test_outputs_that_are_not_logits_are_one_line_errors(wrap: Any) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> Any:
            a = torch.relu(self.conv(x))
            return wrap(self.fc(a.mean(dim=(2, 3))), a)

    with pytest.raises(WhylookError, match=r"must return logits of shape \(B, M\), got "
                                           r"(a tuple|a dict|\(2, 3, 1\))"):
        grad_cam(Net(), "conv", torch.rand(2, 1, 6, 6), [0, 1])


def test_weights_made_under_inference_mode_are_a_one_line_error() -> None:
    with torch.inference_mode():
        model = _tiny_model()  # its parameters are inference tensors: no backward through them
    with pytest.raises(WhylookError, match=r"inference_mode\(\).*outside it"):
        grad_cam(model, "0", _X, [0])


def test_a_lazy_model_not_yet_run_is_a_one_line_error() -> None:
    def lazy() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))

    for call in (lambda m: grad_cam(m, "0", _X, [0]), lambda m: GradCAM(m, "0"),
                 lambda m: next(layer_features(m, "0", _X))):
        with pytest.raises(WhylookError, match=r"Lazy module.*run it once on a batch"):
            call(lazy())
    model = lazy()
    model(torch.zeros(1, *_X.shape[1:]))  # the first forward gives the weights their shapes
    assert grad_cam(model, "0", _X, [0]).saliency.shape[0] == _X.shape[0]


def test_bad_layers_and_inputs() -> None:
    model = _tiny_model()
    with pytest.raises(WhylookError, match="not 4-D"):
        grad_cam(model, "2", _X, [0])  # Flatten: (B, 2)
    with pytest.raises(WhylookError, match="not a module"):
        grad_cam(model, "nope", _X, [0])
    with pytest.raises(WhylookError, match="shape"):
        grad_cam(model, "0", _X[0], [0])
    with pytest.raises(WhylookError, match="labels"):
        grad_cam(model, "0", _X, [0, 1])
    with pytest.raises(WhylookError, match="labels"):
        grad_cam(model, "0", _X, np.array([0.5]))
    with pytest.raises(WhylookError, match="batch_size"):
        grad_cam(model, "0", _X, [0], batch_size=0)
    with pytest.raises(WhylookError, match=r"images is empty \(0 samples\)"):
        grad_cam(model, "0", _X[:0], [])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_images_the_model_cannot_take_are_one_line_errors(channels_last: bool) -> None:
    model = _tiny_model()
    # Three channels for a one-channel model: torch's own first line, and what to check.
    with pytest.raises(WhylookError) as info:
        grad_cam(model, "0", torch.rand(2, 3, 4, 4), [0, 1], channels_last=channels_last)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the model failed on input of shape (2, 3, 4, 4): ")
    assert message.endswith("check that the images have the channels and size the model was "
                            "built for")
    # NaN pixels give NaN logits: refused, never returned as NaN maps.
    with pytest.raises(WhylookError, match="returned NaN or infinite logits"):
        grad_cam(model, "0", torch.full((1, 1, 4, 4), float("nan")), [0],
                 channels_last=channels_last)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_too_small_map_names_working_layers() -> None:
    model = _resnet()
    with pytest.raises(WhylookError, match=r"smaller than 2x2.*layer3 \(256x2x2\)"):
        grad_cam(model, "layer4", torch.rand(2, 3, 32, 32), [0, 1])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_module_reused_in_forward_is_refused() -> None:
    model = _resnet()  # each BasicBlock calls its ``relu`` twice
    with pytest.raises(WhylookError, match=r"more than once.*layer3"):
        grad_cam(model, "layer3.1.relu", torch.rand(2, 3, 32, 32), [0, 1])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_layer_features_and_shape() -> None:
    model = _resnet()
    x = torch.rand(5, 3, 32, 32)
    feats = list(layer_features(model, "layer2", x, batch_size=2))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 4, 4)] * 2 + [(1, 128, 4, 4)]
    full = grad_cam(model, "layer2", x, [0] * 5, batch_size=2, return_features=True).features
    np.testing.assert_array_equal(torch.cat(feats).numpy(), full)
    assert layer_output_shape(model, "layer3", (3, 32, 32)) == (256, 2, 2)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_batches_with_features_equal_batches_and_stay_tensors() -> None:
    model = _resnet()
    x = torch.rand(5, 3, 32, 32)
    y = [1, 2, 3, 4, 5]
    with GradCAM(model, "layer2") as cam:
        plain = list(cam.batches(x, y, batch_size=2, return_features=True))
        tensors = list(cam.batches_with_features(x, y, batch_size=2))
    assert [len(r) for r, _ in tensors] == [2, 2, 1]
    for p, (r, f) in zip(plain, tensors, strict=True):
        assert isinstance(f, torch.Tensor)
        assert r.features is None
        # Equal up to float rounding, not bit for bit: the two passes run the same code,
        # but on CPUs with AVX-512 MKL's kernels round by the batch's memory alignment
        # (one of these maps differed by 4e-6 relative on an Intel Xeon, and no longer
        # with MKL_CBWR=COMPATIBLE), which differs between two allocations of a batch.
        np.testing.assert_allclose(r.saliency, p.saliency, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(r.confidence, p.confidence, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(f.numpy(), p.features, rtol=1e-5, atol=1e-9)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_concat_shards_equals_whole() -> None:
    model = _resnet()
    x = torch.rand(5, 3, 32, 32)
    y = [1, 2, 3, 4, 5]
    whole = grad_cam(model, "layer2", x, y)
    with GradCAM(model, "layer2") as cam:
        parts = [cam(x[:2], y[:2]), cam(x[2:], y[2:])]
    joined = SaliencyResult.concat(parts)
    np.testing.assert_allclose(joined.saliency, whole.saliency, atol=1e-6)
    np.testing.assert_allclose(joined.confidence, whole.confidence, atol=1e-6)


def test_channels_last_matches_and_restores_layout() -> None:
    """The NHWC pass (the CPU default) gives the NCHW values and leaves the model's layout."""
    model = _resnet()
    x = torch.rand(4, 3, 32, 32)
    y = [1, 2, 3, 4]
    nhwc = grad_cam(model, "layer2", x, y, channels_last=True, return_features=True)
    assert all(p.is_contiguous() for p in model.parameters())
    nchw = grad_cam(model, "layer2", x, y, channels_last=False, return_features=True)
    np.testing.assert_allclose(nhwc.saliency, nchw.saliency, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nhwc.confidence, nchw.confidence, atol=1e-6)
    np.testing.assert_allclose(nhwc.features, nchw.features, rtol=1e-4, atol=1e-5)
    # A model the user laid out in NHWC stays NHWC.
    model.to(memory_format=torch.channels_last)
    grad_cam(model, "layer2", x, y)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "images",
    [
        lambda: np.random.default_rng(0).integers(0, 256, (5, 1, 9, 8), dtype=np.uint8),
        lambda: np.random.default_rng(0).integers(0, 256, (5, 9, 8), dtype=np.uint8)[:, None],
        lambda: torch.rand(5, 1, 9, 8),
        lambda: torch.rand(5, 9, 8, 1).permute(0, 3, 1, 2),
    ],
    ids=["uint8", "uint8-new-axis", "float", "float-nhwc"],
)
def test_a_one_channel_batch_reaches_the_model_with_nhwc_strides(images) -> None:
    """With one channel, NCHW and NHWC strides address the same bytes and torch takes the
    first for NCHW (oneDNN's convolution then writes NCHW): however the caller's array is
    laid out, the NHWC pass hands the model NHWC strides, and the values do not move."""
    x = images()
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    seen: list[tuple[int, ...]] = []
    net[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].stride()))
    y = [0, 1, 2, 0, 1]
    nhwc = grad_cam(net, "2", x, y, channels_last=True, batch_size=2)
    assert seen == [(72, 1, 8, 1)] * 3
    nchw = grad_cam(net, "2", x, y, channels_last=False, batch_size=2)
    np.testing.assert_allclose(nhwc.saliency, nchw.saliency, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nhwc.confidence, nchw.confidence, atol=1e-6)


def test_channels_last_falls_back_for_models_that_need_nchw() -> None:
    class ViewNet(nn.Module):  # .view() after a convolution needs NCHW strides
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv(x)
            return self.fc(a.view(a.shape[0], -1))

    net = ViewNet()
    x = torch.rand(3, 3, 8, 8)
    res = grad_cam(net, "conv", x, [0, 1, 0], channels_last=True)
    ref = grad_cam(net, "conv", x, [0, 1, 0], channels_last=False)
    np.testing.assert_allclose(res.saliency, ref.saliency, atol=1e-6)
    assert all(p.is_contiguous() for p in net.parameters())

    # Later automatic sessions on the same object start in NCHW (explain runs one per
    # checkpoint on one model object); another object tries NHWC again.
    layouts: list[bool] = []

    def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))

    handle = net.conv.register_forward_pre_hook(record)
    auto = grad_cam(net, "conv", x, [0, 1, 0], batch_size=2)
    handle.remove()
    assert layouts == [False, False]  # two batches, each run once
    np.testing.assert_allclose(auto.saliency, ref.saliency, atol=1e-6)
    other = ViewNet()
    other.conv.register_forward_pre_hook(record)
    layouts.clear()
    grad_cam(other, "conv", x, [0, 1, 0], batch_size=2)
    assert layouts == [True, False, False]  # NHWC failed on the first batch, then NCHW


def test_a_failure_in_both_layouts_does_not_pin_the_model_to_nchw() -> None:
    """Only a model that then ran in NCHW is remembered as one that needs it."""
    from whylook import saliency

    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)
            self.fail = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise RuntimeError("CUDA out of memory (simulated)")
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    net = Flaky()
    with pytest.raises(WhylookError, match="out of memory"):
        grad_cam(net, "conv", torch.rand(2, 3, 8, 8), [0, 1])
    assert net not in saliency._NCHW_ONLY
    net.fail = False
    with GradCAM(net, "conv") as cam:
        assert cam._session.channels_last


def test_rows_gather_equals_slicing() -> None:
    model = _resnet()
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8).numpy()
    rows = np.array([7, 2, 2, 5])
    labels = np.array([1, 2, 3, 4])
    picked = grad_cam(model, "layer2", images, labels, rows=rows, batch_size=3)
    sliced = grad_cam(model, "layer2", images[rows], labels, batch_size=3)
    np.testing.assert_array_equal(picked.saliency, sliced.saliency)
    feats = torch.cat(list(layer_features(model, "layer2", images, rows=rows, batch_size=3)))
    np.testing.assert_array_equal(
        feats.numpy(),
        torch.cat(list(layer_features(model, "layer2", images[rows], batch_size=3))).numpy(),
    )
    with pytest.raises(WhylookError, match="rows"):
        grad_cam(model, "layer2", images, labels, rows=np.array([0, 1, 2, 9]))


# -- users' models: in-place layers, wrappers, inputs changed in place, storage ---------------


class _SkipNet(nn.Module):
    """The layer ``act`` is ``ReLU(inplace=True)``: its output *is* the convolution's output,
    which the skip connection reads as well, so d logit / dA has two paths."""

    def __init__(self, layer: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act: nn.Module = nn.ReLU(inplace=True) if layer == "relu" else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        a = self.act(y)
        return self.fc((self.conv2(a) + y).mean((2, 3)))


@pytest.mark.parametrize("layer", ["relu", "identity"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_a_layer_whose_output_is_also_read_elsewhere_counts_every_read(
    layer: str, channels_last: bool
) -> None:
    torch.manual_seed(3)
    net = _SkipNet(layer).eval()
    x, y = torch.rand(3, 3, 9, 9), torch.tensor([0, 2, 1])
    # The closed form: A feeds both conv2 and the skip.
    a = net.conv1(x).detach()
    a = (torch.relu(a) if layer == "relu" else a).requires_grad_(True)
    logit = net.fc((net.conv2(a) + a).mean((2, 3))).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(logit, a)
    truth = torch.relu(torch.einsum("bc,bchw->bhw", g.mean((2, 3)), a.detach())).numpy()

    res = grad_cam(net, "act", x, y, channels_last=channels_last, return_features=True)
    np.testing.assert_allclose(res.saliency, truth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.features, a.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert all(p.requires_grad for p in net.parameters())  # flags restored


def test_an_in_place_change_of_the_layers_output_elsewhere_is_a_one_line_error() -> None:
    class Changes(_SkipNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv1(x)
            a = self.act(y)
            y.mul_(2.0)  # changes A after the layer, through the other reference
            return self.fc(self.conv2(a).mean((2, 3)))

    with pytest.raises(WhylookError, match=r"changes layer 'act'.s output in place") as info:
        grad_cam(Changes(), "act", torch.rand(2, 3, 9, 9), [0, 1])
    assert "\n" not in str(info.value)


def test_a_forward_set_on_a_conv_instance_runs_under_fusion() -> None:
    """A wrapper that replaces ``conv.forward`` (an adapter, a monkeypatch) is not fused away."""
    torch.manual_seed(0)
    # Fusing applies before the layer ("4"), where no gradient is needed.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3))
    conv = net[0]
    plain = conv.forward
    calls = []

    def adapted(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return plain(x) + 0.5 * plain(x).flip(-1)

    conv.forward = adapted
    x, y = torch.rand(4, 3, 10, 10), [0, 1, 2, 0]
    fused = grad_cam(net, "4", x, y, fuse=True)
    assert calls
    ref = grad_cam(net, "4", x, y, fuse=False)
    np.testing.assert_allclose(fused.saliency, ref.saliency, rtol=1e-5, atol=1e-7)


def test_a_forward_that_changes_its_input_in_place_sees_it_once() -> None:
    """One channel and ``.view`` after a convolution: the NHWC try fails after the model
    has already shifted its input; the NCHW retry must get the batch as it was."""

    class Shifts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x -= 0.5
            a = self.conv(x)
            return self.fc(a.view(a.shape[0], -1))

    torch.manual_seed(1)
    net = Shifts().eval()
    x = torch.rand(5, 1, 8, 8)
    y = [0, 1, 2, 0, 1]
    res = grad_cam(net, "conv", x.clone(), y, channels_last=True)
    ref = grad_cam(net, "conv", x.clone(), y, channels_last=False)
    np.testing.assert_allclose(res.saliency, ref.saliency, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        plain = torch.softmax(net(x.clone()), dim=1).numpy()
    np.testing.assert_allclose(res.confidence, plain, atol=1e-6)


def test_a_model_with_a_conv3d_runs_in_the_automatic_layout() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c3 = nn.Conv3d(1, 3, 1)
            self.c2 = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.c2(self.c3(x[:, None]).mean(1)).mean((2, 3)))

    torch.manual_seed(2)
    net, x = Mixed(), torch.rand(2, 3, 16, 16)
    auto = grad_cam(net, "c2", x, [0, 1])
    ref = grad_cam(net, "c2", x, [0, 1], channels_last=False)
    np.testing.assert_allclose(auto.saliency, ref.saliency, rtol=1e-5, atol=1e-7)
    assert net.c3.weight.is_contiguous()


def test_the_nhwc_pass_gives_back_the_same_tensors() -> None:
    """Weights come back in their own memory (a model in shared memory stays shared, a numpy
    view still sees them), a buffer two modules share stays one, and weights loaded inside
    a ``with GradCAM`` block are kept."""
    torch.manual_seed(4)
    net = _resnet()
    kernel = torch.rand(1, 1, 3, 3)
    net.conv1.register_buffer("k", kernel)
    net.layer1.register_buffer("k", kernel)
    net.share_memory()
    before = {name: p.data_ptr() for name, p in net.named_parameters()}
    view = net.conv1.weight.detach().numpy()
    grad_cam(net, "layer2", torch.rand(2, 3, 32, 32), [0, 1], channels_last=True)
    assert {name: p.data_ptr() for name, p in net.named_parameters()} == before
    assert all(p.is_shared() for p in net.parameters())
    assert net.conv1.k is net.layer1.k
    with torch.no_grad():
        net.conv1.weight.add_(1.0)
    assert view[0, 0, 0, 0] == net.conv1.weight[0, 0, 0, 0].item()

    # Other values for every weight (the shared buffer once: both its keys load into it).
    other = {k: v + 0.1 * torch.rand_like(v) if v.is_floating_point() and not k.endswith(".k")
             else v.clone() for k, v in net.state_dict().items()}
    with GradCAM(net, "layer2", channels_last=True) as cam:
        cam(torch.rand(2, 3, 32, 32), [0, 1])
        net.load_state_dict(other)
    for name, value in other.items():
        assert torch.equal(net.state_dict()[name], value), name
    assert {name: p.data_ptr() for name, p in net.named_parameters()} == before


def _three_convs() -> nn.Sequential:
    # Two Conv2d -> ReLU pairs before layer "4": inside a ``with GradCAM`` block on CPU the
    # model runs in NHWC with those pairs fused, the state a caller's own call meets.
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


@pytest.mark.parametrize("how", [{}, {"fuse": False, "channels_last": False}])
def test_the_callers_own_model_calls_inside_the_block_run_as_usual(how: dict[str, Any]) -> None:
    model = _three_convs()
    x, y = torch.rand(5, 1, 8, 8), [0, 1, 2, 0, 1]
    with torch.no_grad():
        expected = model(x)
    alone = grad_cam(model, "4", x, y, **how)
    with GradCAM(model, "4", **how) as cam:
        before = model(x)  # before the cam's first pass
        first = cam(x, y)
        after = model(x)  # after it: once counted as the layer's second run
        again = cam(x, y)
    for out in (before, after):
        assert not out.requires_grad  # the cam's leaf is not handed to the caller
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for res in (first, again):
        np.testing.assert_allclose(res.saliency, alone.saliency, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res.confidence, alone.confidence, rtol=1e-5, atol=1e-7)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize(("outer", "inner"), [("4", "0"), ("0", "4")])
@pytest.mark.parametrize("how", [{}, {"fuse": False, "channels_last": False}])
def test_nested_cams_on_one_model_give_each_its_own_maps(
    outer: str, inner: str, how: dict[str, Any]
) -> None:
    model = _three_convs()
    x, y = torch.rand(5, 1, 8, 8), [0, 1, 2, 0, 1]
    alone = {layer: grad_cam(model, layer, x, y, **how) for layer in (outer, inner)}
    with GradCAM(model, outer, **how) as a, GradCAM(model, inner, **how) as b:
        both = {outer: a(x, y), inner: b(x, y)}
        both[outer] = a(x, y)  # after the inner cam's pass too
    for layer, res in both.items():
        np.testing.assert_allclose(res.saliency, alone[layer].saliency, rtol=1e-5, atol=1e-7)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_a_layer_run_twice_in_the_cams_own_pass_is_still_refused_after_a_callers_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.act(self.conv(x))).mean((2, 3)))

    model = Twice()
    x = torch.rand(2, 1, 8, 8)
    with GradCAM(model, "act") as cam:
        model(x)  # the caller's own call neither counts nor hides the second run
        with pytest.raises(WhylookError, match=r"'act' runs more than once per forward pass"):
            cam(x, [0, 1])


_INTEGER_IMAGES = [
    pytest.param(np.int32, "int32",
                 r"images\.astype\(np\.uint8\) for 0-255 values, or float images divided by their "
                 r"maximum", id="np-int32"),
    pytest.param(np.int64, "int64", r"images\.astype\(np\.uint8\)", id="np-int64"),
    pytest.param(np.uint16, "uint16", r"images\.astype\(np\.uint8\)", id="np-uint16"),
    pytest.param(np.bool_, "bool", r"images\.astype\(np\.float32\)", id="np-bool"),
    pytest.param(torch.int64, "int64",
                 r"images\.to\(torch\.uint8\) for 0-255 values, or float images divided by their "
                 r"maximum",
                 id="torch-int64"),
    pytest.param(torch.int32, "int32", r"images\.to\(torch\.uint8\)", id="torch-int32"),
    pytest.param(torch.bool, "bool", r"images\.float\(\)", id="torch-bool"),
]


@pytest.mark.parametrize(("dtype", "name", "example"), _INTEGER_IMAGES)
def test_integer_images_other_than_uint8_are_refused(dtype: Any, name: str, example: str) -> None:
    """0-255 pixels in a wider integer type were fed to the model unscaled (silently wrong
    maps); only uint8 is scaled by 1/255."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 4, 4))
    images: Any = (torch.from_numpy(pixels).to(dtype) if isinstance(dtype, torch.dtype)
                   else pixels.astype(dtype))
    model = _tiny_model()
    calls = [
        lambda: grad_cam(model, "0", images, [0, 1]),
        lambda: GradCAM(model, "0")(images, [0, 1]),
        lambda: next(GradCAM(model, "0").batches(images, [0, 1])),
        lambda: next(GradCAM(model, "0").batches_with_features(images, [0, 1])),
        lambda: next(layer_features(model, "0", images)),
    ]
    for call in calls:
        with pytest.raises(WhylookError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"images are {name}; pass uint8 (0-255) or float in [0, 1], ")
        assert re.search(example, message), message
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_device_strings_are_resolved_like_the_rest_of_whylook() -> None:
    model = _tiny_model()
    ref = grad_cam(model, "0", _X, [0])
    for device in ("auto", "cpu", torch.device("cpu")):
        res = grad_cam(model, "0", _X, [0], device=device)
        np.testing.assert_allclose(res.saliency, ref.saliency, atol=1e-7)
        assert GradCAM(model, "0", device=device)(_X, [0]).saliency.shape == (1, 2, 2)
        feats = next(layer_features(model, "0", _X, device=device))
        assert tuple(feats.shape) == (1, 2, 2, 2)
    for call in (lambda d: grad_cam(model, "0", _X, [0], device=d),
                 lambda d: GradCAM(model, "0", device=d),
                 lambda d: next(layer_features(model, "0", _X, device=d))):
        with pytest.raises(WhylookError, match=r"^unknown device 'gpu'; use auto, cpu or cuda$"):
            call("gpu")
        if not torch.cuda.is_available():
            with pytest.raises(WhylookError, match="torch sees no CUDA GPU"):
                call("cuda")
    assert next(model.parameters()).device.type == "cpu"
