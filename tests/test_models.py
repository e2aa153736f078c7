"""Every built-in model on MNIST- and CIFAR-shaped input, prototype layers, user factories."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from whylook.errors import WhylookError
from whylook.models import (
    MODEL_NAMES,
    Normalize,
    build_model,
    check_trainable,
    default_layer,
    get_layer,
    layer_shape,
    resolve_device,
)

EXPECTED_LAYER = {
    # model: (default layer, (d, h, w) on 1x28x28, (d, h, w) on 3x32x32)
    "smallcnn": ("block3", (64, 7, 7), (64, 8, 8)),
    "resnet18": ("layer3", (256, 7, 7), (256, 8, 8)),
    "resnet50": ("layer3", (1024, 7, 7), (1024, 8, 8)),
    "inception_v3": ("Mixed_7c", (2048, 8, 8), (2048, 8, 8)),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["mnist", "cifar"])
def test_forward_and_default_prototype_layer(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, num_classes=10, in_channels=shape[0], image_size=shape[1:])
    layer, mnist_shape, cifar_shape = EXPECTED_LAYER[name]
    expected = mnist_shape if shape[0] == 1 else cifar_shape
    assert default_layer(model) == layer
    # One batch-2 forward checks the logits and the layer's map (the big models are slow).
    seen = []
    get_layer(model, layer).register_forward_hook(lambda m, i, out: seen.append(out.shape))
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(2, *shape))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert seen == [(2, *expected)]
    if name in {"smallcnn", "resnet18"}:
        assert layer_shape(model, layer, shape) == expected


def test_built_in_models_normalise_inside_and_keep_it_in_the_state_dict() -> None:
    model = build_model(
        "smallcnn",
        num_classes=3,
        in_channels=2,
        image_size=(16, 12),
        mean=(0.1, 0.2),
        std=(0.5, 0.25),
    )
    state = model.state_dict()
    assert state["normalize.mean"].flatten().tolist() == pytest.approx([0.1, 0.2])
    assert state["normalize.std"].flatten().tolist() == pytest.approx([0.5, 0.25])
    x = torch.rand(1, 2, 16, 12)
    expected = (x - torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(
        1, 2, 1, 1
    )
    assert torch.allclose(model.normalize(x), expected)
    assert isinstance(get_layer(model, "normalize"), Normalize)
    resnet = build_model("resnet18", num_classes=3, in_channels=1, image_size=28)
    assert "normalize.mean" in resnet.state_dict()
    assert resnet.conv1.kernel_size == (3, 3)  # CIFAR-style stem on small images


def test_large_images_keep_the_imagenet_stem_and_a_deeper_layer() -> None:
    model = build_model("resnet18", num_classes=5, in_channels=3, image_size=224)
    assert model.conv1.kernel_size == (7, 7)
    assert default_layer(model) == "layer4"
    assert layer_shape(model, "layer4", (3, 224, 224)) == (512, 7, 7)


def test_a_layer_without_a_spatial_map_names_layers_that_work() -> None:
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(WhylookError, match=r"1x1 map .* layers that work: .*layer1 \(64x8x8\)"):
        layer_shape(model, "layer4", (1, 8, 8))
    with pytest.raises(WhylookError, match=r"not \(B, d, h, w\)"):
        layer_shape(model, "fc", (1, 8, 8))


def test_unknown_layer_lists_candidates() -> None:
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(WhylookError, match=r"did you mean block3\?.*block1, block2, block3"):
        get_layer(model, "blok3")
    assert isinstance(get_layer(model, "block3.conv"), torch.nn.Conv2d)


def test_unknown_model_and_too_small_images() -> None:
    with pytest.raises(WhylookError, match="did you mean resnet50"):
        build_model("resnet5O", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(WhylookError, match="at least 8x8"):
        build_model("smallcnn", num_classes=10, in_channels=1, image_size=4)
    with pytest.raises(WhylookError, match=">= 2 classes"):
        build_model("smallcnn", num_classes=1, in_channels=1, image_size=28)


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def tiny(num_classes, in_channels, image_size):
                return nn.Sequential(
                    nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

            def tagged(num_classes, in_channels, image_size):
                model = tiny(num_classes, in_channels, image_size)
                model.whylook_layer = "0"
                return model

            def not_a_model(**kwargs):
                return 42

            def wrong_signature(n_classes):
                return tiny(n_classes, 1, 9)

            def buggy(num_classes, in_channels, image_size):
                raise TypeError("a bug in the user's factory")

            def wrong_classes(num_classes, in_channels, image_size):
                return tiny(num_classes + 1, in_channels, image_size)

            class Wrapped(nn.Module):
                def __init__(self, model, wrap):
                    super().__init__()
                    self.model, self.wrap = model, wrap

                def forward(self, x):
                    return self.wrap(self.model(x))

            def tuple_out(num_classes, in_channels, image_size):
                return Wrapped(tiny(num_classes, in_channels, image_size), lambda y: (y, 0))

            def dict_out(num_classes, in_channels, image_size):
                return Wrapped(tiny(num_classes, in_channels, image_size), lambda y: {"logits": y})

            def int_out(num_classes, in_channels, image_size):
                return Wrapped(tiny(num_classes, in_channels, image_size), lambda y: y.long())

            def noisy(num_classes, in_channels, image_size):
                # A random layer that draws from torch's generator in eval mode too.
                return Wrapped(tiny(num_classes, in_channels, image_size),
                               lambda y: y + 0 * torch.rand_like(y))

            def no_params(num_classes, in_channels, image_size):
                return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())

            def double(num_classes, in_channels, image_size):
                return tiny(num_classes, in_channels, image_size).double()

            def too_few_channels(num_classes, in_channels, image_size):
                return tiny(num_classes, in_channels + 1, image_size)

            def frozen(num_classes, in_channels, image_size):
                return tiny(num_classes, in_channels, image_size).requires_grad_(False)

            def in_eval(num_classes, in_channels, image_size):
                return tiny(num_classes, in_channels, image_size).eval()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_user_factory(user_package: str) -> None:
    tagged = build_model(f"{user_package}:tagged", num_classes=4, in_channels=3, image_size=9)
    assert default_layer(tagged) == "0"
    plain = build_model(f"{user_package}:tiny", num_classes=4, in_channels=3, image_size=9)
    # Without whylook_layer, the deepest top-level layer with a map >= 2x2 is chosen.
    assert default_layer(plain, (3, 9, 9)) == "1"
    with pytest.raises(WhylookError, match="no whylook_layer"):
        default_layer(plain)
    assert plain(torch.rand(2, 3, 9, 9)).shape == (2, 4)
    with pytest.raises(WhylookError, match=r"not a torch\.nn\.Module"):
        build_model(f"{user_package}:not_a_model", num_classes=4, in_channels=3, image_size=9)
    with pytest.raises(WhylookError, match="no callable 'nope'"):
        build_model(f"{user_package}:nope", num_classes=4, in_channels=3, image_size=9)
    with pytest.raises(WhylookError, match="cannot import"):
        build_model("no_such_pkg_xyz:f", num_classes=4, in_channels=3, image_size=9)
    with pytest.raises(WhylookError, match=r"cannot be called as factory\(num_classes="):
        build_model(f"{user_package}:wrong_signature", num_classes=4, in_channels=3, image_size=9)


USER_MODEL_ERRORS = {
    # factory: the whole message (the model is built for 4 classes, 3x9x9 images)
    "buggy": "the model factory my_models:buggy raised TypeError: a bug in the user's factory; "
    "fix the factory (call it in Python to see the traceback)",
    "wrong_classes": "model my_models:wrong_classes returns logits of shape (2, 5) for a batch "
    "of 2 images, not (2, 4); its forward must return one logit per class, (batch, 4)",
    "tuple_out": "model my_models:tuple_out returns a tuple, not a tensor; its forward must "
    "return one (batch, 4) float tensor of logits, one per class",
    "dict_out": "model my_models:dict_out returns a dict, not a tensor; its forward must "
    "return one (batch, 4) float tensor of logits, one per class",
    "int_out": "model my_models:int_out returns int64 logits; its forward must return one "
    "(batch, 4) float tensor of logits, one per class",
    "no_params": "model my_models:no_params has no parameters, so there is nothing to train; "
    "return a model with weights (e.g. nn.Conv2d and nn.Linear layers)",
    "double": "model my_models:double has float64 weights; return a float32 model (whylook "
    "feeds it float32 images), e.g. without .double() or .half()",
    "too_few_channels": "model my_models:too_few_channels fails on 3x9x9 input (RuntimeError: ",
}


@pytest.mark.parametrize("factory", sorted(USER_MODEL_ERRORS))
def test_a_user_model_whylook_cannot_use_is_refused_when_built(
    user_package: str, factory: str
) -> None:
    with pytest.raises(WhylookError) as info:
        build_model(f"{user_package}:{factory}", num_classes=4, in_channels=3, image_size=9)
    message = str(info.value)
    assert "\n" not in message
    if factory == "too_few_channels":
        assert message.startswith(USER_MODEL_ERRORS[factory])
        assert message.endswith("; check the data's channels and image size")
    else:
        assert message == USER_MODEL_ERRORS[factory]


def test_the_factory_error_keeps_its_traceback_for_python_callers(user_package: str) -> None:
    with pytest.raises(WhylookError) as info:
        build_model(f"{user_package}:buggy", num_classes=4, in_channels=3, image_size=9)
    assert isinstance(info.value.__cause__, TypeError)


def test_checking_a_model_leaves_its_mode_and_the_rng_alone(user_package: str) -> None:
    # The check's forward draws random numbers (noisy's layer does); they must not move the
    # caller's stream: the same draws follow as after calling the factory alone.
    torch.manual_seed(0)
    model = build_model(f"{user_package}:noisy", num_classes=4, in_channels=3, image_size=9)
    assert model.training
    after = torch.rand(1)
    torch.manual_seed(0)
    noisy = importlib.import_module(user_package).noisy
    noisy(num_classes=4, in_channels=3, image_size=(9, 9))
    assert torch.equal(torch.rand(1), after)
    # A model its factory returns in eval mode stays in eval mode.
    assert not build_model(f"{user_package}:in_eval", num_classes=4, in_channels=3,
                           image_size=9).training


def test_a_frozen_model_is_built_but_cannot_be_trained(user_package: str) -> None:
    # explain takes gradients with the weights frozen, so only training refuses it.
    model = build_model(f"{user_package}:frozen", num_classes=4, in_channels=3, image_size=9)
    with pytest.raises(WhylookError) as info:
        check_trainable(model, f"{user_package}:frozen")
    assert str(info.value) == (
        "model my_models:frozen has no trainable parameters (every one has "
        "requires_grad=False); leave at least some of its weights trainable"
    )
    check_trainable(build_model("smallcnn", num_classes=2, in_channels=1, image_size=8), "s")


@pytest.mark.parametrize("spec", [":", ":f", ".rel:f", "..rel:f", "a..b:f", "a b:f", "1x:f"])
def test_a_model_name_without_a_module_is_refused(spec: str) -> None:
    with pytest.raises(WhylookError) as info:
        build_model(spec, num_classes=4, in_channels=3, image_size=9)
    assert str(info.value) == (
        f"model {spec!r} does not name a module; use package.module:factory with an absolute "
        "module path (e.g. my_models:build)"
    )


def test_a_module_that_fails_on_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_models.py").write_text("raise RuntimeError('half-written\\nmodule')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(WhylookError) as info:
            build_model("broken_models:f", num_classes=4, in_channels=3, image_size=9)
    finally:
        sys.modules.pop("broken_models", None)
    assert str(info.value) == (
        "importing 'broken_models' for model 'broken_models:f' raised RuntimeError: "
        "half-written; fix the module (import it in Python to see the traceback)"
    )


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(WhylookError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(WhylookError, match="unknown device"):
        resolve_device("tpu")
