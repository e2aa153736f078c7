"""``precision="bfloat16"``: the pass in torch's mixed precision, the CAM and softmax in
float32, with the model, hooks and autocast state restored; the explanation's cache keeps
the two precisions apart and records which one ran."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _tiny_run import baseline, copy_run
from whylook import saliency
from whylook.errors import WhylookError
from whylook.explain import ExplainSettings, explain
from whylook.finetune import load_prototypes, training_activity
from whylook.run import RunFolder
from whylook.saliency import PRECISIONS, GradCAM, grad_cam, layer_features

_H = _W = 6


def _model() -> nn.Sequential:
    """conv -> ReLU -> conv (the layer, "2") -> global average pool -> linear, with weights
    and inputs that bfloat16 cannot hold exactly."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5),
    )


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(7, 1, _H, _W, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 2])


def test_precisions_are_named() -> None:
    assert PRECISIONS == ("float32", "bfloat16")


def test_bfloat16_pass_against_the_closed_form() -> None:
    """A is the autocast pass's output (every value a bfloat16 number, close to float32's
    but not equal). The head (average pool, then the linear layer under autocast) gives
    d logit_y / d A_c = bf16(W[y, c]) / (h w) exactly, since the gradient of the summed
    logits is 1: so alpha, and the CAM I = ReLU(sum_c alpha_c A_c), are known in closed
    form; the confidences are the float32 softmax of the autocast head's bfloat16 logits."""
    model = _model()
    x, y = _inputs()
    exact = grad_cam(model, "2", x, y, return_features=True)
    half = grad_cam(model, "2", x, y, return_features=True, precision="bfloat16")
    assert exact.features is not None
    assert half.features is not None
    a = torch.from_numpy(half.features)
    assert a.dtype == torch.float32
    assert torch.equal(a.bfloat16().float(), a), "the activations are not bfloat16 values"
    assert not np.array_equal(half.features, exact.features)
    scale = np.abs(exact.features).max()
    np.testing.assert_allclose(half.features, exact.features, atol=2e-2 * scale)

    lin = model[5]
    w = lin.weight.detach()
    alpha = w.bfloat16().float()[y] / (_H * _W)
    cam = torch.relu(torch.einsum("bc,bchw->bhw", alpha, a))
    np.testing.assert_allclose(half.saliency, cam.numpy(), rtol=1e-6, atol=1e-7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(a.mean(dim=(2, 3)))
    assert logits.dtype == torch.bfloat16
    np.testing.assert_allclose(half.confidence, torch.softmax(logits.float(), 1).numpy(),
                               atol=1e-6)
    # And the maps stay what float32 gives, up to the rounding.
    assert np.corrcoef(half.saliency.ravel(), exact.saliency.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(half.confidence, exact.confidence, atol=2e-2)


def test_layer_features_match_the_grad_cam_pass() -> None:
    model = _model()
    x, y = _inputs()
    res = grad_cam(model, "2", x, y, return_features=True, precision="bfloat16")
    feats = torch.cat(list(layer_features(model, "2", x, batch_size=3, precision="bfloat16")))
    assert feats.dtype == torch.float32
    np.testing.assert_array_equal(feats.numpy(), res.features)


def _state(model: nn.Module) -> tuple[object, ...]:
    return (
        [m.training for m in model.modules()],
        [(p.dtype, p.requires_grad) for p in model.parameters()],
        sum(len(m._forward_hooks) for m in model.modules()),
    )


def test_autocast_and_model_are_restored_also_on_error() -> None:
    model = _model().train()
    before = _state(model)
    x, y = _inputs()
    grad_cam(model, "2", x, y, precision="bfloat16")
    assert not torch.is_autocast_enabled("cpu")
    assert _state(model) == before

    class Exploding(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("explodes after the layer")

    broken = _model()
    broken[5] = Exploding()
    with pytest.raises(WhylookError, match="explodes after the layer"):
        grad_cam(broken, "2", x, y, precision="bfloat16")
    assert not torch.is_autocast_enabled("cpu")
    assert sum(len(m._forward_hooks) for m in broken.modules()) == 0

    # A caller's own autocast block is left as it was.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with GradCAM(model, "2", precision="bfloat16") as cam:
            cam(x, y)
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_resnet_maps_agree_with_float32() -> None:
    """Batch norm, residual additions, max-pooling, and layer4 with its backward, all under
    bfloat16 autocast: the maps still follow float32's closely."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = list(range(8))
    exact = grad_cam(model, "layer3", x, labels)
    half = grad_cam(model, "layer3", x, labels, precision="bfloat16")
    corr = np.corrcoef(half.saliency.ravel(), exact.saliency.ravel())[0, 1]
    assert corr > 0.99, corr
    np.testing.assert_allclose(half.confidence, exact.confidence, atol=2e-2)


@pytest.mark.parametrize("value", ["float16", "bf16", None, 16])
def test_unknown_precision_is_a_one_line_error(value: object) -> None:
    x, y = _inputs()
    message = "precision must be one of 'float32', 'bfloat16', not "
    with pytest.raises(WhylookError, match=message) as info:
        grad_cam(_model(), "2", x, y, precision=value)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    with pytest.raises(WhylookError, match=message):
        next(layer_features(_model(), "2", x, precision=value))  # type: ignore[arg-type]


def test_a_model_not_in_float32_is_a_one_line_error() -> None:
    x, y = _inputs()
    with pytest.raises(WhylookError, match=re.escape(
            "applies to float32 models, and this one is float64; convert it with model.float()")):
        grad_cam(_model().double(), "2", x.double(), y, precision="bfloat16")


def _cache(run: Path) -> set[str]:
    return {p.name for p in (run / "analysis" / "cache").iterdir()}


def test_explain_keys_its_cache_by_precision(tmp_path_factory, tmp_path, monkeypatch) -> None:
    """A bfloat16 explain of an explained run computes its own shards and prototypes (the
    float32 ones stay, under their old names), records the setting, and a float32 explain
    afterwards reads its cache and gives its first result again."""
    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run")
    first = explain(run, progress=False)
    exact_files = _cache(run)
    half = explain(run, settings=ExplainSettings(precision="bfloat16"), progress=False)
    half_files = _cache(run) - exact_files
    assert _cache(run) >= exact_files
    assert len(half_files) == len(exact_files)
    assert half.data["settings"]["precision"] == "bfloat16"
    assert half.precision == "bfloat16"
    assert half.summary().splitlines()[0].endswith("; passes in bfloat16")
    assert "bfloat16" not in first.summary()
    # finetune and compare find the explanation's prototypes by reassigning its rows, in
    # the precision it recorded: the bfloat16 ones, not float32's beside them.
    (half_protos,) = [n for n in half_files if n.startswith("prototypes-")]
    with np.load(run / "analysis" / "cache" / half_protos) as z:
        centers = z["centers"]
    seen: list[str] = []

    def spy(*args: object, precision: str = "float32", **kw: object) -> object:
        seen.append(precision)
        return layer_features(*args, precision=precision, **kw)

    monkeypatch.setattr(saliency, "layer_features", spy)
    np.testing.assert_array_equal(load_prototypes(run, half, device="cpu").centers, centers)
    assert seen == ["bfloat16"]
    monkeypatch.undo()

    # The curated set's activity over the training split: in the explanation's precision,
    # cached apart from float32's.
    made: list[str] = []

    class Spy(saliency.GradCAM):
        def __init__(self, *args: object, precision: str = "float32", **kw: object) -> None:
            made.append(precision)
            super().__init__(*args, precision=precision, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(saliency, "GradCAM", Spy)
    folder = RunFolder.open(run)
    cpu = torch.device("cpu")
    training_activity(folder, half, load_prototypes(run, half, device="cpu"), device=cpu)
    assert made == ["bfloat16"]
    before = {p.name for p in (run / "finetune" / "cache").iterdir()}
    training_activity(folder, first, load_prototypes(run, first, device="cpu"), device=cpu)
    assert made == ["bfloat16", "float32"]
    after = {p.name for p in (run / "finetune" / "cache").iterdir()}
    assert len(after) == 2 * len(before)
    monkeypatch.undo()
    assert first.data["settings"]["precision"] == "float32"
    s32, s16 = first.arrays["saliency"], half.arrays["saliency"]
    assert not np.array_equal(s32, s16)
    assert np.corrcoef(s32.ravel(), s16.ravel())[0, 1] > 0.99
    again = explain(run, progress=False)
    assert _cache(run) == exact_files | half_files
    for name, value in first.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], value, err_msg=name)
    saved = json.loads((run / "analysis" / "explanation.json").read_text())
    assert saved["settings"]["precision"] == "float32"


def test_older_explanations_read_as_float32(tmp_path_factory) -> None:
    from whylook.explain import load_explanation

    _, reference = baseline(tmp_path_factory)
    exp = load_explanation(reference)
    del exp.data["settings"]["precision"]
    assert exp.precision == "float32"


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "says"),
    [(True, True, None), (False, True, "about float32's speed"),
     (False, False, "several times slower")],
)
def test_a_cpu_without_amx_gets_one_warning(monkeypatch, amx, avx512_bf16, says) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(saliency, "_WARNED", set())
    x, y = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # an explain makes one pass per checkpoint: one warning
            grad_cam(_model(), "2", x, y, precision="bfloat16")
        grad_cam(_model(), "2", x, y)  # float32 says nothing
    texts = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if says is None:
        assert texts == []
    else:
        assert len(texts) == 1
        assert says in texts[0]
        assert texts[0].endswith("use 'float32'")


def test_the_cli_records_the_precision_and_warns_in_one_line(
    tmp_path_factory, tmp_path, monkeypatch, capsys
) -> None:
    from whylook.cli import main

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(saliency, "_WARNED", set())
    _, reference = baseline(tmp_path_factory)
    run = copy_run(reference, tmp_path / "run")
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("default")

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            # As Python shows a warning outside pytest, which records them instead.
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        assert main(["explain", str(run), "--k", "4", "--precision", "bfloat16"]) == 0
    assert warnings.formatwarning is before
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert lines == [
        "warning: this CPU has no bfloat16 instructions (AMX or AVX-512 BF16): precision "
        "'bfloat16' is emulated and runs several times slower than float32; use 'float32'"
    ]
    saved = json.loads((run / "analysis" / "explanation.json").read_text())
    assert saved["settings"]["precision"] == "bfloat16"
