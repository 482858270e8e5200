"""timm models by name: preprocessing from their pretrained configs, weights, errors, any-size inputs, and
Grad-CAM on ViT / Swin against pytorch-grad-cam with a token reshape written here."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM as PeerGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from methods import GradCAM, build_explainer
from models import available_models, load_model
from models.errors import ModelError
from models.preprocessing import preprocess, preprocess_one, resize_image
from models.spec import ModelSpec
from models.timm_models import takes_any_size

EXAMPLES = {  # name -> (CAM layer, token layout)
    "timm:resnet50.a1_in1k": ("layer4", None),
    "timm:vit_base_patch16_224.augreg_in21k_ft_in1k": ("blocks.11.norm1", "tokens"),
    "timm:deit_small_patch16_224": ("blocks.11.norm1", "tokens"),
    "timm:swin_tiny_patch4_window7_224": ("layers.3", "nhwc"),
    "timm:convnext_tiny": ("stages.3", None),
}
TRANSFORMERS = ["timm:vit_base_patch16_224.augreg_in21k_ft_in1k", "timm:deit_small_patch16_224",
                "timm:swin_tiny_patch4_window7_224"]
TINY = "timm:deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def specs():
    """Each example loaded once with random weights."""
    loaded = {}

    def get(name):
        if name not in loaded:
            torch.manual_seed(0)
            with pytest.warns(UserWarning, match="RANDOM weights"):
                loaded[name] = load_model(name, "random")
        return loaded[name]
    return get


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_load_with_random_weights_and_find_their_layer(name, specs):
    spec = specs(name)
    assert (spec.target_layer, spec.token_layout) == EXAMPLES[name]
    assert spec.name == name and spec.num_classes == 1000 and spec.categories[285] == "Egyptian cat"
    assert spec.input_size == (224, 224) and spec.fixed_input is False
    assert not spec.model.training


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_take_other_input_sizes(name, specs):
    spec = specs(name)
    patch = 4 if "swin" in name else 16
    assert spec.input_multiple == patch
    maps_side = {4: 32, 16: 16}[patch]
    explainer = build_explainer("gradcam", spec)
    for size in [(322, 322), (224, 320)]:
        maps, logits = explainer(torch.randn(2, 3, *size), [1, 2])
        assert logits.shape == (2, 1000) and torch.isfinite(maps).all()
        assert maps.shape == (2, 1, size[0] // maps_side, size[1] // maps_side)


def test_preprocessing_comes_from_the_pretrained_config(specs):
    vit = specs("timm:vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5) and vit.input_size == (224, 224)
    assert vit.resize_interpolation == "bicubic" and vit.crop_pct == 0.9
    deit = specs("timm:deit_small_patch16_224")
    assert deit.mean == (0.485, 0.456, 0.406) and deit.resize_interpolation == "bicubic"
    assert deit.timm_model == "deit_small_patch16_224.fb_in1k"


def test_bicubic_resize_only_where_the_config_says_so():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    plain = ModelSpec("m", torch.nn.Identity(), "", [], input_size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    bicubic = ModelSpec("m", torch.nn.Identity(), "", [], input_size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1),
                        resize_interpolation="bicubic")
    bilinear = F.interpolate(pixels[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    cubic = F.interpolate(pixels[None], size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(preprocess_one(image, plain, "cpu"), bilinear)
    assert torch.equal(preprocess([image], plain, "cpu"), bilinear)
    assert torch.equal(preprocess_one(image, bicubic, "cpu"), cubic.clamp(0, 1))
    assert torch.equal(preprocess([image], bicubic, "cpu"), cubic.clamp(0, 1))
    assert not torch.equal(cubic.clamp(0, 1), bilinear)
    assert torch.equal(resize_image(pixels, (32, 32)), bilinear[0])


def reference_model(name):
    torch.manual_seed(7)
    with pytest.warns(UserWarning):
        return load_model(name, "random").model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_weights_files_round_trip(suffix, tmp_path):
    reference = reference_model(TINY)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    spec = load_model(TINY, str(path))
    assert spec.weights == str(path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(spec.model(x), reference(x))


def assert_one_line(error, *parts):
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_bad_weights_files_give_one_line_errors(tmp_path):
    with pytest.raises(ModelError) as error:
        load_model(TINY, str(tmp_path / "missing.safetensors"))
    assert_one_line(error, "weights file not found")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelError) as error:
        load_model(TINY, str(junk))
    assert_one_line(error, "cannot read weights file", str(junk))
    wrong = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in reference_model("timm:vit_small_patch16_224").state_dict().items()},
              wrong)
    with pytest.raises(ModelError) as error:
        load_model(TINY, str(wrong))
    assert_one_line(error, f"does not fit {TINY}", "with another shape", "cls_token (1, 1, 384) vs (1, 1, 192)")


def test_unknown_timm_names_suggest_close_ones():
    with pytest.raises(ModelError) as error:
        load_model("timm:vit_bas_patch16_224", "random")
    assert_one_line(error, "unknown timm model 'vit_bas_patch16_224'", "timm:vit_base_patch16_224")
    with pytest.raises(ModelError) as error:
        load_model("timm:resnet50.not_a_tag", "random")
    assert_one_line(error, "timm has no pretrained tag 'not_a_tag' for resnet50", "timm:resnet50.a1_in1k")
    with pytest.raises(ModelError) as error:
        load_model("resnet5000")
    assert_one_line(error, "timm:<name>")
    assert "timm:<name>" in available_models() and len(available_models()) < 200


def test_default_weights_offline_give_one_line_error_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.monotonic()
    with pytest.raises(ModelError) as error:
        load_model(TINY)
    assert time.monotonic() - start < 10
    assert_one_line(error, TINY, "timm/deit_tiny_patch16_224.fb_in1k", str(tmp_path / "hf" / "hub"),
                    str(tmp_path / "torch" / "hub" / "checkpoints"), "HF_HOME", "TORCH_HOME", "--weights PATH",
                    "--weights random")


def test_default_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch):
    reference = reference_model(TINY)
    repo = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = load_model(TINY)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(spec.model(x), reference(x))
    assert spec.target_layer == "blocks.11.norm1"


def test_categories_of_other_heads():
    with pytest.warns(UserWarning):
        spec = load_model("timm:vit_tiny_patch16_224.augreg_in21k", "random")
    assert spec.num_classes == 21843 and spec.categories[0] == "organism, being"


def test_target_layer_override_keeps_the_token_layout_and_checks_it():
    with pytest.warns(UserWarning):
        spec = load_model(TINY, "random", target_layer="blocks.9")
    assert spec.target_layer == "blocks.9" and spec.token_layout == "tokens"
    maps, _ = build_explainer("gradcam", spec)(torch.randn(1, 3, 224, 224), [3])
    assert maps.shape == (1, 1, 14, 14)
    with pytest.raises(ModelError) as error, pytest.warns(UserWarning):
        load_model(TINY, "random", target_layer="head")
    assert_one_line(error, "target layer 'head' does not hold the model's tokens layout")


def test_a_fixed_size_model_is_recorded_as_such():
    fixed = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=1, num_classes=10)
    dynamic = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=1, num_classes=10,
                                dynamic_img_size=True)
    assert not takes_any_size(fixed) and takes_any_size(dynamic)


# ----------------------------------------------------------------------------------------------------
# Peer parity: pytorch-grad-cam with a reshape transform written here
# ----------------------------------------------------------------------------------------------------

def vit_tokens_to_map(tokens, prefix=1, side=14):
    batch, _, dim = tokens.shape
    return tokens[:, prefix:].reshape(batch, side, side, dim).permute(0, 3, 1, 2)


def swin_to_map(output):
    return output.permute(0, 3, 1, 2)


@pytest.mark.parametrize("name, reshape", [("timm:vit_tiny_patch16_224", vit_tokens_to_map),
                                           ("timm:swin_tiny_patch4_window7_224", swin_to_map),
                                           ("vit_b_16", vit_tokens_to_map)])
def test_gradcam_on_transformers_equals_pytorch_grad_cam(name, reshape, specs):
    spec = specs(name)
    torch.manual_seed(1)
    if name == "vit_b_16":  # torchvision initialises ViT's head to zeros: every gradient would be 0
        torch.nn.init.normal_(spec.model.heads.head.weight, std=0.02)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        targets = spec.model(x).argmax(dim=1).tolist()
    ours = GradCAM(spec.model, spec.layer, spec.activation_post)
    maps, _ = ours(x, targets)
    final = ours.finalize(maps, (224, 224))[:, 0].numpy()
    peer_targets = [ClassifierOutputTarget(t) for t in targets]
    with PeerGradCAM(model=spec.model, target_layers=[spec.layer], reshape_transform=reshape) as cam:
        peer_final = cam(input_tensor=x, targets=peer_targets)
        outputs = cam.activations_and_grads(x)
        spec.model.zero_grad()
        sum(t(o) for t, o in zip(peer_targets, outputs, strict=True)).backward()
        activations = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        peer_raw = cam.get_cam_image(x, spec.layer, peer_targets, activations, grads, eigen_smooth=False)
    spec.model.zero_grad(set_to_none=True)
    assert float((final > 0).mean()) > 0.2             # the maps are not trivially zero
    np.testing.assert_allclose(final, peer_final, atol=1e-4)
    np.testing.assert_allclose(maps[:, 0].numpy(), peer_raw, rtol=1e-4, atol=1e-4 * np.abs(peer_raw).max())


def test_torchvision_vit_reads_its_last_block_as_tokens_and_takes_its_own_size_only(specs):
    spec = specs("vit_b_16")
    assert spec.target_layer == "encoder.layers.encoder_layer_11.ln_1" and spec.token_layout == "tokens"
    assert spec.fixed_input is True
    maps, logits = build_explainer("gradcam", spec)(torch.randn(1, 3, 224, 224), 3)
    assert maps.shape == (1, 1, 14, 14) and logits.shape == (1, 1000) and bool(maps.isfinite().all())


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
                                  "timm:swin_tiny_patch4_window7_224"])
def test_ucag_on_transformers_keeps_the_paper_fold(name, specs):
    """UCAG's crops reach the transformer at alpha * crop (322 px), and the map is the paper's fold of the
    per-crop maps: computed here crop by crop, from F.interpolate and CropGrid, independently of UCAG's
    batching and its CPU upscaling."""
    from ucag import UCAG, CropGrid, crop_confidence

    spec = specs(name)
    explainer = build_explainer("gradcam", spec)
    ucag = UCAG(explainer, crop=124, n=2, alpha=2.6)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = int(spec.model(x).argmax())
    seen = []
    handle = spec.model.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    try:
        maps, _ = ucag(x, target)
    finally:
        handle.remove()
    assert (322, 322) in seen and maps.shape == (1, 1, 224, 224)
    grid = CropGrid(224, 224, 124, 2)
    folded = torch.zeros(1, 1, 224, 224)
    for top, left, bottom, right in grid.boxes():
        crop = F.interpolate(x[..., top:bottom, left:right], size=(322, 322), mode="bicubic", align_corners=False)
        crop_map, logits = explainer(crop, target)
        weight = crop_confidence(logits, torch.tensor([target]))
        folded[..., top:bottom, left:right] += F.interpolate(crop_map * weight, size=(124, 124), mode="bilinear",
                                                             align_corners=False, antialias=True)
    expected = folded / grid.duplication()
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(maps, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("name, layer, layout, grid", [
    ("timm:eva02_tiny_patch14_224.mim_in22k", "blocks.11.norm1", "PatchTokens(num_prefix=1)", (16, 16)),
    ("timm:cait_xxs24_224", "blocks.23.norm1", "PatchTokens(num_prefix=0)", (14, 14)),  # class token joins later
    ("timm:swinv2_tiny_window8_256", "layers.3", "ChannelsLastMap()", (8, 8)),
])
def test_other_timm_transformers_get_a_token_layout(name, layer, layout, grid):
    """EVA (prefix 1), CaiT (prefix 0 before its class-attention blocks) and Swin V2 (NHWC): before, the
    automatic finder read Swin V2's channels-last map as (B, C, h, w) and CaiT's attention matrix as a map."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        spec = load_model(name, "random")
    assert spec.target_layer == layer and repr(spec.activation_post) == layout
    maps, _ = build_explainer("gradcam", spec)(torch.randn(1, 3, *spec.input_size), 1)
    assert maps.shape[-2:] == grid and bool(maps.isfinite().all())


def test_swin_v2_gradcam_equals_pytorch_grad_cam():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        spec = load_model("timm:swinv2_tiny_window8_256", "random")
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    ours = build_explainer("gradcam", spec)
    maps, logits = ours(x)
    target = int(logits.argmax())
    with PeerGradCAM(model=spec.model, target_layers=[spec.layer], reshape_transform=swin_to_map) as cam:
        peer = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    spec.model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(ours.finalize(maps, (256, 256))[:, 0].numpy(), peer, atol=1e-4)


@pytest.mark.parametrize("name", ["timm:hiera_tiny_224", "timm:crossvit_tiny_240"])
def test_transformers_whose_tokens_cannot_be_placed_ask_for_a_layer(name):
    with pytest.warns(UserWarning, match="RANDOM weights"), \
            pytest.raises(ModelError, match=r"no CAM layer is known for \w+: .*pass --target-layer"):
        load_model(name, "random")


def test_sise_layers_of_other_timm_transformers():
    from models.timm_models import token_block_ends

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        swin_v2 = load_model("timm:swinv2_tiny_window8_256", "random")
        eva = load_model("timm:eva02_tiny_patch14_224.mim_in22k", "random")
    assert token_block_ends(swin_v2.model) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert token_block_ends(eva.model) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11.norm1"]
    maps, _ = build_explainer("sise", eva, mask_batch=64)(torch.randn(1, 3, 224, 224), 1)
    assert maps.dim() == 4 and maps.shape[:2] == (1, 1) and bool(maps.isfinite().all())
