"""Every registered explainer under the same contract, on one small random ResNet (the transformer methods on
a tiny random ViT instead): raw (B, 1, h, w) maps, the model's own logits, per-sample targets, no hooks or
gradients left behind, grad mode kept, and a run through UCAG."""
import copy
import dataclasses

import pytest
import torch

from methods import available_methods, build_explainer
from methods.errors import MethodError
from methods.transformer import METHODS as TRANSFORMER_METHODS
from models import load_model
from tests.vit_fixtures import tiny_vit_spec
from ucag import UCAG

# cheap settings for the methods that score many masked or rescaled copies
FAST = {"rise": {"n_masks": 24, "mask_batch": 10}, "scorecam": {"mask_batch": 100},
        "cameras": {"resolutions": (64, 96)}, "igcam": {"steps": 4}, "sise": {"mask_batch": 100},
        "adasise": {"mask_batch": 100}, "extremal": {"max_iter": 3}}


# RAP and AGF keep or drop terms on exact zeros, and a float32 convolution of a batch may round a near-zero
# value differently from the same image alone: the batch equals single images in float64 (1e-12)
FLOAT32_SENSITIVE = {"rap", "agf"}
# SISE / Ada-SISE binarise with Otsu thresholds: 1e-5 batch noise can move a pixel across the gate, so
# tests/test_sise.py checks batch against single images statistically instead
OTSU_GATED = {"sise", "adasise"}


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return load_model("resnet18", "random")


@pytest.fixture(scope="module")
def tiny_vit():
    """The transformer-only methods' model: a 2-block ViT taking any input size."""
    return tiny_vit_spec()


def spec_for(method, request):
    """resnet18, or the tiny ViT for the methods that need a ViT-style transformer."""
    return request.getfixturevalue("tiny_vit" if method in TRANSFORMER_METHODS else "resnet18")


# outside explainers through their adapters (methods/adapters.py) keep the same contract
ADAPTED = ["captum:LayerGradCam", "captum:IntegratedGradients", "captum:Saliency"]
FAST["captum:IntegratedGradients"] = {"n_steps": 4}


@pytest.mark.parametrize("method", available_methods() + ADAPTED)
def test_contract(method, request):
    spec = spec_for(method, request)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    explainer = build_explainer(method, spec, **FAST.get(method, {}))
    spec.model.zero_grad(set_to_none=True)
    before = hook_count(spec.model)
    with torch.no_grad():
        maps, logits = explainer(x, [3, 7])
        assert not torch.is_grad_enabled()
        expected_logits = spec.model(x)
    assert maps.dim() == 4 and maps.shape[:2] == (2, 1) and torch.isfinite(maps).all()
    assert torch.allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert hook_count(spec.model) == before
    assert all(p.grad is None for p in spec.model.parameters())
    assert not any(m.training for m in spec.model.modules())
    if method in FLOAT32_SENSITIVE:  # checked in float64 instead (see the comment above)
        model64 = copy.deepcopy(spec.model).double()
        explainer = build_explainer(method, dataclasses.replace(spec, model=model64))
        x = x.double()
        maps, _ = explainer(x, [3, 7])
    if method in OTSU_GATED:
        return
    single, _ = explainer(x[1:], [7])
    assert torch.allclose(maps[1], single[0], rtol=1e-3, atol=1e-5 * maps.abs().max().item())


@pytest.mark.parametrize("method", available_methods())
def test_runs_through_ucag(method, request):
    spec = spec_for(method, request)
    explainer = build_explainer(method, spec, **FAST.get(method, {}))
    maps, logits = UCAG(explainer, crop=150, n=2, alpha=1.2)(torch.randn(2, 3, 64, 64), [1, 2])
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and logits.shape == (2, spec.num_classes)


def test_transformer_methods_refuse_the_resnet(resnet18):
    """Each transformer-only method is checked on the ViT above; on a CNN its builder refuses in one line."""
    for method in TRANSFORMER_METHODS:
        with pytest.raises(MethodError, match=f"^{method}: needs a ViT-style transformer.*; resnet18 has none$"):
            build_explainer(method, resnet18)
