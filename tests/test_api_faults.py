"""Python API mistakes a new user makes: a wrong dtype, an empty batch, inference mode, float targets, bad
UCAG parameters. Each gives a one-line error (or, for inference mode, the same maps as outside it)."""
import argparse
import dataclasses
import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from app.flags import UsageError
from app.setup import check_geometry
from methods import build_explainer, finalize_maps
from methods.errors import MethodError
from methods.postprocess import zero_maps
from models import load_model
from models.spec import ModelSpec
from models.timm_models import read_weights, timm_spec
from tests.vit_fixtures import tiny_vit
from ucag import UCAG, CropGrid, UpscaledInput

pytestmark = pytest.mark.usefixtures("one_thread")

# cheap settings: every kind of gradient path (CAM hook, input gradient, bias terms, relevance, path integral)
GRADIENT_METHODS = {"gradcam": {}, "layercam": {}, "fullgrad": {}, "gradient": {}, "guided": {}, "lrp": {},
                    "igcam": {"steps": 2}, "cameras": {"resolutions": (32, 48)}}


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return load_model("resnet18", "random")


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_batch_in_another_float_dtype_names_both_dtypes(dtype, resnet18, batch):
    for explainer in (build_explainer("gradcam", resnet18), UCAG(build_explainer("gradcam", resnet18), n=2, alpha=1)):
        with pytest.raises(MethodError) as exc:
            explainer(batch.to(dtype), [1, 2])
        assert str(dtype) in one_line(exc) and "torch.float32" in str(exc.value)


def test_a_uint8_batch_says_to_normalise(resnet18, batch):
    images = (batch * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(MethodError, match="models.preprocess") as exc:
        build_explainer("gradcam", resnet18)(images)
    one_line(exc)


def test_a_float64_model_takes_a_float64_batch(resnet18, batch):
    model = load_model("resnet18", "random")
    model.model.double()
    maps, logits = build_explainer("gradcam", model)(batch.double(), [1, 2])
    assert logits.dtype == torch.float64 and torch.isfinite(maps).all()


def test_an_empty_batch_is_refused_in_one_line(resnet18, batch):
    explainer = build_explainer("gradcam", resnet18)
    for wrapped in (explainer, UCAG(explainer, n=2, alpha=1), UpscaledInput(explainer, 2.0)):
        with pytest.raises(MethodError, match="empty batch") as exc:
            wrapped(batch[:0])
        one_line(exc)
    with pytest.raises(MethodError, match="empty batch"):
        UCAG(explainer, n=2, alpha=1).explain_blends(batch[:0], None, ("constant",))


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_gradient_methods_work_inside_inference_mode_and_no_grad(method, resnet18, batch):
    explainer = build_explainer(method, resnet18, **GRADIENT_METHODS[method])
    targets = torch.tensor([1, 2])
    expected, expected_logits = explainer(batch, targets)
    with torch.no_grad():
        no_grad_maps, _ = explainer(batch, targets)
    with torch.inference_mode():
        inference_batch, inference_targets = batch.clone(), targets.clone()  # inference tensors, as a user has
        maps, logits = explainer(inference_batch, inference_targets)
        assert torch.is_inference_mode_enabled()
    assert not maps.is_inference() and not logits.is_inference()
    assert torch.equal(maps, expected) and torch.equal(logits, expected_logits) and torch.equal(no_grad_maps, expected)


def test_ucag_works_inside_inference_mode(resnet18, batch):
    ucag = UCAG(build_explainer("gradcam", resnet18), n=2, alpha=1.5)
    expected = ucag(batch, [1, 2]).maps
    with torch.inference_mode():
        maps = ucag(batch.clone(), torch.tensor([1, 2])).maps
        logits = resnet18.model(batch)
        blends = ucag.explain_blends(batch.clone(), torch.tensor([1, 2]), ("constant",), logits=logits)
    assert torch.equal(maps, expected) and torch.equal(blends["constant"].maps, expected)


def test_float_targets_are_taken_when_whole_and_refused_when_not(resnet18, batch):
    explainer = build_explainer("gradcam", resnet18)
    expected = explainer(batch, [1, 2]).maps
    assert torch.equal(explainer(batch, torch.tensor([1.0, 2.0])).maps, expected)
    for bad in ([1.5, 2], [1, math.nan], torch.tensor([2.9, 1.0])):
        with pytest.raises(MethodError, match="whole numbers") as exc:
            explainer(batch, bad)
        one_line(exc)
    with pytest.raises(MethodError, match="integers"):
        explainer(batch, [True, False])


@pytest.mark.parametrize("kwargs, wording", [
    ({"alpha": math.nan}, "alpha must be positive and finite, got nan"),
    ({"alpha": math.inf}, "alpha must be positive and finite, got inf"),
    ({"alpha": -1.0}, "alpha must be positive and finite"),
    ({"alpha": "2"}, "alpha must be positive and finite"),
    ({"n": 2.5}, "n must be an integer of at least 2, got 2.5"),
    ({"n": 1}, "n must be an integer of at least 2, got 1"),
    ({"n": True}, "n must be an integer of at least 2"),
    ({"crop": math.nan}, r"crop must be in \(0, 224\]"),
    ({"crop": 300}, r"crop must be in \(0, 224\]"),
    ({"patch_batch": 2.5}, "patch_batch must be a positive integer"),
])
def test_ucag_parameters_are_checked_at_construction(kwargs, wording, resnet18):
    explainer = build_explainer("gradcam", resnet18)
    with pytest.raises(MethodError, match=wording) as exc:
        UCAG(explainer, **kwargs)
    one_line(exc)


@pytest.mark.parametrize("alpha", [math.inf, math.nan, 0.0])
def test_upscaled_input_checks_alpha_at_construction(alpha, resnet18):
    with pytest.raises(MethodError, match="alpha must be positive and finite"):
        UpscaledInput(build_explainer("gradcam", resnet18), alpha)


def test_patch_grid_refuses_a_fractional_n():
    with pytest.raises(ValueError, match="n must be an integer of at least 2, got 2.5"):
        CropGrid(224, 224, 124, 2.5)


def test_upper_case_safetensors_suffix_is_read_as_safetensors(tmp_path):
    state = {"weight": torch.arange(6.0).view(2, 3)}
    for name in ("w.SAFETENSORS", "w.SafeTensors"):
        save_file(state, tmp_path / name)
        assert torch.equal(read_weights(str(tmp_path / name))["weight"], state["weight"])


def geometry(alpha, crop=124.0, n=6):
    return argparse.Namespace(num_patches=n, alpha=alpha, crop_size=crop, patch_batch=None)


def test_alpha_caps_skip_fixed_input_models_only():
    fixed = ModelSpec("fixed", torch.nn.Identity(), "", [], fixed_input=True)
    dynamic = ModelSpec("dynamic", torch.nn.Identity(), "", [])
    check_geometry(geometry(alpha=100.0), fixed)       # 124 * 100 px: no crop of that size is ever made
    check_geometry(geometry(alpha=0.01), fixed)        # 1 px crops: not made either
    with pytest.raises(UsageError, match="above the 4096 px limit"):
        check_geometry(geometry(alpha=100.0), dynamic)
    with pytest.raises(UsageError, match="below the 32 px"):
        check_geometry(geometry(alpha=0.01), dynamic)
    for spec in (fixed, dynamic):
        with pytest.raises(UsageError, match="alpha must be positive and finite"):
            check_geometry(geometry(alpha=math.inf), spec)
        with pytest.raises(UsageError, match="-c/--crop-size: .*empty crop"):
            check_geometry(geometry(alpha=2.0, crop=0.5), spec)


@pytest.fixture(scope="module")
def vit_spec():
    return timm_spec(tiny_vit(dynamic_img_size=True, dynamic_img_pad=True), "tiny_vit")


@pytest.mark.parametrize("layer", ["norm", "blocks.1.attn"])
def test_zero_gradients_after_the_last_attention_warn_once(layer, vit_spec):
    explainer = build_explainer("gradcam", dataclasses.replace(vit_spec, target_layer=layer))
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = explainer.finalize(explainer(x).maps, (32, 32))
        explainer(x)
        UCAG(explainer, n=2, alpha=1)(x)
    notes = [str(w.message) for w in caught if "exactly zero" in str(w.message)]
    assert len(notes) == 1 and f"layer '{layer}'" in notes[0] and "2 of 2 images" in notes[0], notes
    assert zero_maps(maps).tolist() == [True, True]


@pytest.mark.parametrize("method, options", [("igcam", {"steps": 2}), ("cameras", {"resolutions": (32, 48)})])
def test_zero_gradients_warn_in_the_path_and_resolution_cams(method, options, vit_spec):
    explainer = build_explainer(method, dataclasses.replace(vit_spec, target_layer="norm"), **options)
    with pytest.warns(RuntimeWarning, match="exactly zero"):
        explainer(torch.randn(1, 3, 32, 32))


def test_a_layer_the_score_depends_on_gives_no_warning(vit_spec):
    explainer = build_explainer("gradcam", vit_spec)  # blocks.1.norm1, before the last attention
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        maps = explainer.finalize(explainer(torch.randn(2, 3, 32, 32)).maps, (32, 32))
    assert not zero_maps(maps).any()


def test_zero_maps_flags_all_zero_final_maps_only():
    maps = torch.zeros(3, 1, 4, 4)
    maps[1, 0, 2, 3] = 1e-30
    maps[2] = finalize_maps(torch.full((1, 1, 4, 4), 5.0))  # a constant raw map: all zero once final
    assert zero_maps(maps).tolist() == [True, False, True]
