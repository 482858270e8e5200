"""Token layouts: transformer layer outputs as (B, C, h, w) maps with exact gradients, on tiny timm models."""
import dataclasses

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from methods import build_explainer
from methods.hooks import LayerCapture
from methods.sise import block_end_layers
from models.timm_models import timm_spec
from models.tokens import ChannelsLastMap, PatchTokens
from ucag import UCAG

LAYER_METHODS = {
    "gradcam": {}, "gradcam++": {}, "xgradcam": {}, "wgradcam": {}, "layercam": {},
    "scorecam": {"mask_batch": 64}, "igcam": {"steps": 3}, "cameras": {"resolutions": (32, 48)},
    "sise": {"mask_batch": 64}, "adasise": {"mask_batch": 64},
}


def tiny_vit(reg_tokens=0, **kwargs):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                              reg_tokens=reg_tokens, dynamic_img_size=True, **kwargs).eval()
    return dataclasses.replace(timm_spec(model, "tiny_vit"), input_size=(32, 32))


def tiny_swin():
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 1), window_size=4,
                            num_classes=10, dynamic_img_size=True).eval()
    return dataclasses.replace(timm_spec(model, "tiny_swin"), input_size=(32, 32))


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def swin():
    return tiny_swin()


def reference_grid(tokens, prefix, h, w):
    """Patch tokens (B, prefix + h*w, D) -> (B, D, h, w), written independently of models.tokens."""
    batch, _, dim = tokens.shape
    return tokens[:, prefix:].reshape(batch, h, w, dim).permute(0, 3, 1, 2)


def test_tiny_models_get_token_layouts_and_layers(vit, swin):
    assert (vit.target_layer, vit.token_layout) == ("blocks.1.norm1", "tokens")
    assert isinstance(vit.activation_post, PatchTokens) and vit.activation_post.num_prefix == 1
    assert (swin.target_layer, swin.token_layout) == ("layers.1", "nhwc")
    assert isinstance(swin.activation_post, ChannelsLastMap)
    assert block_end_layers(vit.model) == ["blocks.0", "blocks.1.norm1"]
    assert block_end_layers(swin.model) == ["layers.0", "layers.1"]


def capture_with_full_graph(spec, x):
    """The target layer's raw output and dS/d(output) for target 3, from a plain hook and the full graph."""
    store = {}

    def hook(module, inputs, output):
        output.retain_grad()
        store["output"] = output

    handle = spec.layer.register_forward_hook(hook)
    try:
        logits = spec.model(x)
    finally:
        handle.remove()
    logits[:, 3].sum().backward()
    return store["output"].detach(), store["output"].grad


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_gradient_of_the_map_is_the_token_gradient_rearranged(which, request):
    spec = request.getfixturevalue(which)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 48)
    tokens, token_grads = capture_with_full_graph(spec, x)
    with LayerCapture(spec.layer, spec.activation_post) as capture:
        logits = capture.forward(spec.model, x)
    (grads,) = torch.autograd.grad(logits[:, 3].sum(), capture.activation)
    if which == "vit":
        expected, expected_grads = reference_grid(tokens, 1, 4, 6), reference_grid(token_grads, 1, 4, 6)
    else:
        expected, expected_grads = tokens.permute(0, 3, 1, 2), token_grads.permute(0, 3, 1, 2)
    assert capture.activation.shape == expected.shape
    assert torch.allclose(capture.activation.detach(), expected, atol=1e-6)
    assert torch.allclose(grads, expected_grads, atol=1e-7, rtol=1e-4)
    assert float(grads.abs().max()) > 0
    with torch.no_grad():
        assert torch.allclose(logits, spec.model(x), atol=1e-5)


def test_register_and_class_tokens_are_dropped_on_a_non_square_odd_input():
    spec = tiny_vit(reg_tokens=4)
    assert spec.activation_post.num_prefix == 5
    torch.manual_seed(2)
    x = torch.randn(1, 3, 35, 41)                   # patch 8: rows 32.., cols 40.. are ignored -> a 4x5 grid
    tokens, _ = capture_with_full_graph(spec, x)
    assert tokens.shape[1] == 5 + 4 * 5
    with LayerCapture(spec.layer, spec.activation_post) as capture:
        capture.forward(spec.model, x)
    assert torch.allclose(capture.activation.detach(), reference_grid(tokens, 5, 4, 5), atol=1e-6)


def test_a_layout_on_a_wrong_output_or_outside_watch_raises():
    vit = tiny_vit()
    layout = PatchTokens(vit.model.patch_embed, 1)
    with pytest.raises(RuntimeError, match="patch grid is unknown"):
        layout.to_spatial(torch.zeros(1, 17, 32))
    with layout.watch():
        vit.model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="got 20 tokens; 1 prefix tokens and a 4x4 patch grid make 17"):
        layout.to_spatial(torch.zeros(1, 20, 32))
    with pytest.raises(RuntimeError, match="expected a \\(B, h, w, C\\) map"):
        ChannelsLastMap().to_spatial(torch.zeros(1, 17, 32))


def test_to_output_is_a_new_tensor_so_in_place_ops_after_the_layer_are_safe(swin):
    spatial = torch.randn(1, 16, 4, 4, requires_grad=True)
    output = ChannelsLastMap().to_output(spatial, spatial.detach().permute(0, 2, 3, 1))
    assert output.data_ptr() != spatial.data_ptr() and output.is_contiguous()
    output.add_(1)                                  # no autograd error, leaf untouched
    assert not torch.equal(output.permute(0, 3, 1, 2), spatial.detach())


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_a_batch_equals_its_images_one_by_one(which, request):
    spec = request.getfixturevalue(which)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    explainer = build_explainer("gradcam", spec)
    maps, _ = explainer(x, [1, 4, 7])
    singles = torch.cat([explainer(x[i:i + 1], [t])[0] for i, t in enumerate([1, 4, 7])])
    assert torch.allclose(maps, singles, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", list(LAYER_METHODS))
@pytest.mark.parametrize("which", ["vit", "swin"])
def test_every_layer_method_runs_on_tiny_transformers(method, which, request):
    spec = request.getfixturevalue(which)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32)
    maps, logits = build_explainer(method, spec, **LAYER_METHODS[method])(x, [2, 5])
    assert maps.dim() == 4 and maps.shape[:2] == (2, 1) and logits.shape == (2, 10)
    assert torch.isfinite(maps).all() and float(maps.abs().max()) > 0
    if method in ("gradcam", "scorecam"):
        assert maps.shape[-2:] == ((4, 4) if which == "vit" else (8, 8))


def test_ucag_runs_on_a_tiny_vit_with_upscaled_crops_of_odd_sizes(vit):
    torch.manual_seed(5)
    x = torch.randn(1, 3, 64, 64)
    maps, _ = UCAG(build_explainer("gradcam", vit), crop=124, n=3, alpha=1.3)(x, [2])
    assert maps.shape == (1, 1, 64, 64) and torch.isfinite(maps).all()
