"""SISE and Ada-SISE: block-end layers, channel filtering, OpenCV Otsu, batching, UCAG."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from methods.sise import (
    SISE,
    AdaSISE,
    block_end_layers,
    build_adasise,
    build_sise,
    layer_posts,
    otsu_thresholds,
    traced_block_ends,
)
from models import PAPER_MODELS, load_model
from ucag import UCAG

PROBE = (64, 64)  # small trace input: the block structure is the same as at 224


def tiny_cnn():
    """conv-relu-pool x2, conv-relu, global pool, linear: block ends '1' and '4', CAM layer '7'."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# --- layer selection --------------------------------------------------------------------------------

def test_vgg16_block_ends_are_the_max_pool_inputs():
    model = torchvision.models.vgg16().eval()
    expected = ["features.3", "features.8", "features.15", "features.22", "features.29"]
    assert block_end_layers(model) == expected
    assert all(isinstance(model.features[int(n.split(".")[1]) + 1], nn.MaxPool2d) for n in expected)
    assert traced_block_ends(model, PROBE) == expected           # the generic fallback agrees
    assert expected[-1] == PAPER_MODELS["vgg16"]["target_layer"]


def test_resnet50_block_ends_are_the_stem_and_the_stages(resnet_random):
    expected = ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert block_end_layers(resnet_random.model) == expected
    assert traced_block_ends(resnet_random.model, PROBE) == expected
    assert expected[-1] == resnet_random.target_layer


def test_densenet121_block_ends_end_with_norm5_under_relu():
    spec = load_model("densenet121", "random")
    layers = block_end_layers(spec.model)
    assert layers == ["features.relu0", "features.denseblock1", "features.denseblock2", "features.denseblock3",
                      "features.norm5"]
    # the traced fallback ends with the CAM layer itself, whose output is norm5's
    traced = traced_block_ends(spec.model, PROBE)
    assert traced[:-1] == layers[:-1] and traced[-1] == spec.target_layer == "features"
    posts = layer_posts(spec, layers)
    assert set(posts) == {"features.norm5"}
    assert torch.equal(posts["features.norm5"](torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))


def test_lite_block_ends_precede_the_stride_2_blocks_and_end_with_the_cam_layer(lite):
    layers = block_end_layers(lite.model)
    assert layers == ["blocks.0", "blocks.2", "blocks.4", "blocks.10", "head"]
    assert layers[-1] == lite.target_layer
    for name in layers[:-1]:
        following = lite.model.blocks[int(name.split(".")[1]) + 1]
        assert max(following._depthwise_conv.stride) == 2
    assert traced_block_ends(lite.model, PROBE) == layers


def test_traced_block_ends_of_a_plain_cnn():
    assert traced_block_ends(tiny_cnn(), (32, 32)) == ["1", "4", "7"]


# --- Otsu and channel filtering -----------------------------------------------------------------------

def bimodal_values():
    rng = np.random.default_rng(0)
    low = np.clip(rng.normal(60, 12, 300), 0, 255)
    high = np.clip(rng.normal(190, 15, 200), 0, 255)
    return np.concatenate([low, high]).astype(np.float32) / 255


def test_otsu_threshold_equals_opencv_on_a_bimodal_example():
    values = bimodal_values()
    levels = (values * np.float32(255)).astype(np.uint8)
    expected = cv2.threshold(levels.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
    batch = torch.from_numpy(np.stack([values, values[::-1].copy()]))
    assert otsu_thresholds(batch).tolist() == [expected, expected]
    assert 80 < expected < 170                                     # between the two modes
    # a validity mask restricts the histogram: only the upper mode -> a threshold inside it
    valid = batch > 0.5
    inner = cv2.threshold(levels[levels > 127].reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
    assert otsu_thresholds(batch, valid).tolist() == [inner, inner]


@pytest.mark.parametrize("fusion", ["hard", "soft"])
def test_fusion_gate_is_opencv_otsu(fusion):
    values = bimodal_values()[:484]
    maps = torch.from_numpy(values).view(1, 22, 22)
    levels = (values * np.float32(255)).astype(np.uint8).reshape(22, 22)
    threshold, binary = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    explainer = SISE(tiny_cnn(), ["1"], fusion=fusion)
    gate = explainer._gate(maps)[0]
    if fusion == "hard":
        assert torch.equal(gate, torch.from_numpy(binary / 255.0).float())
    else:  # sigmoid(T (V - t / 255)): at least 10 % of the pixels lie above 1.5 t here, so t is kept
        assert np.count_nonzero(levels >= round(1.5 * threshold)) >= 0.1 * levels.size
        expected = torch.sigmoid((maps[0] - threshold / 255) * 100.0)
        assert torch.allclose(gate, expected, atol=1e-6)


def test_channel_filters_on_hand_made_gradients():
    significance = torch.tensor([[-1.0, 0.0, 0.01, 0.02, 0.03, 0.9, 0.95, 1.0],
                                 [-0.5, -0.1, -0.2, -0.3, -0.4, -0.6, -0.7, -0.8],
                                 [0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0]])
    model = tiny_cnn()
    sise = SISE(model, ["1"]).select_channels(significance)
    ada = AdaSISE(model, ["1"]).select_channels(significance)
    assert sise.tolist() == (significance > 0).tolist()
    assert ada[0].tolist() == [False] * 5 + [True] * 3                 # the upper Otsu class only
    assert not ada[1].any() and ada[2].tolist() == sise[2].tolist()   # none positive; a single one kept
    assert not (ada & ~sise).any()


# --- the explainers on real inputs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(photo_batch):
    """cat and espresso at 64 px (kept small: every mask is a forward pass)."""
    return F.interpolate(photo_batch[1:3], size=(64, 64), mode="bilinear", antialias=True), torch.tensor([285, 967])


@pytest.fixture(scope="module")
def runs(lite, pair):
    x, targets = pair
    out = {}
    for build in (build_sise, build_adasise):
        explainer = build(lite)
        maps, logits = explainer(x, targets)
        out[explainer.name] = (explainer, maps, logits, dict(explainer.last_selection))
    return out


def test_maps_shape_device_and_logits(runs, lite, pair):
    x, _ = pair
    with torch.no_grad():
        expected_logits = lite.model(x)
    for _explainer, maps, logits, _ in runs.values():
        assert maps.shape == (2, 1, 64, 64) and maps.device == x.device
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() > 0
        assert torch.allclose(logits, expected_logits, atol=1e-5) and not logits.requires_grad


def test_adasise_keeps_a_subset_of_sise_channels(runs):
    sise, ada = runs["sise"][3], runs["adasise"][3]
    assert list(sise) == list(ada) == ["blocks.0", "blocks.2", "blocks.4", "blocks.10", "head"]
    for name in sise:
        assert sise[name].shape == ada[name].shape == (2, sise[name].shape[1])
        assert not (ada[name] & ~sise[name]).any()
        assert (ada[name].sum(1) <= sise[name].sum(1)).all()
    assert sum(int(k.sum()) for k in ada.values()) < sum(int(k.sum()) for k in sise.values())
    counts = runs["adasise"][0].kept_counts
    assert all(torch.equal(counts[name], ada[name].sum(1)) for name in ada)


@pytest.mark.parametrize("method", ["sise", "adasise"])
def test_batch_with_per_sample_targets_equals_single_images(method, runs, lite, pair):
    """Equal up to float noise: other batch sizes run other kernels (about 1e-5 relative in the scores),
    which can move a pixel across an Otsu level of the hard gate, so a few pixels may differ."""
    x, targets = pair
    explainer, maps, logits, selection = runs[method]
    single = (build_sise if method == "sise" else build_adasise)(lite, mask_batch=50)  # other chunking too
    for i in range(2):
        single_maps, single_logits = single(x[i:i + 1], targets[i:i + 1])
        assert torch.allclose(logits[i], single_logits[0], rtol=1e-4, atol=1e-4)
        for name in selection:
            assert int((selection[name][i] != single.last_selection[name][0]).sum()) <= 1
        scale = float(maps[i].abs().max())
        close = torch.isclose(maps[i], single_maps[0], rtol=1e-3, atol=1e-4 * scale)
        assert close.float().mean() > 0.995
        assert torch.corrcoef(torch.stack([maps[i].flatten(), single_maps[0].flatten()]))[0, 1] > 0.999


def test_targets_none_explains_the_prediction(lite, pair):
    x, _ = pair
    explainer = build_adasise(lite, layers=["blocks.10", "head"])
    maps, logits = explainer(x[:1])
    again, _ = explainer(x[:1], logits.argmax(1))
    assert torch.allclose(maps, again)


def test_runs_through_ucag():
    torch.manual_seed(0)
    spec = load_model("resnet18", "random")
    x = torch.randn(2, 3, 64, 64)
    # 8 crops of 51 px; SISE on two block ends only, to keep the masked forward passes few on a CPU
    for explainer in (build_adasise(spec), build_sise(spec, layers=["relu", "layer2"])):
        maps, logits = UCAG(explainer, crop=150, n=2, alpha=1.2)(x, [1, 2])
        assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all()
        assert logits.shape == (2, 1000)


# --- options and the model's state ------------------------------------------------------------------

class TinySpec:
    """The ModelSpec fields the builders read."""

    def __init__(self, model, multilabel=False):
        self.model, self.multilabel = model, multilabel
        self.target_layer, self.activation_post, self.input_size = "7", None, (32, 32)


def test_options_are_validated_and_layers_can_be_chosen():
    spec = TinySpec(tiny_cnn())
    assert build_sise(spec).layers == ["1", "4", "7"]
    assert build_sise(spec, layers="4, 7").layers == ["4", "7"]
    assert build_adasise(spec, layers=["7"], mask_batch=3, fusion="SOFT").fusion == "soft"
    assert build_sise(spec).fusion == "soft" and build_adasise(spec).fusion == "hard"
    assert build_sise(TinySpec(tiny_cnn(), multilabel=True)).multilabel
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="mask_batch"):
            build_sise(spec, mask_batch=bad)
    with pytest.raises(ValueError, match="not found"):
        build_sise(spec, layers=["nope"])
    with pytest.raises(ValueError, match="fusion"):
        build_sise(spec, fusion="mean")
    with pytest.raises(ValueError, match="non-empty"):
        build_sise(spec, layers=[])


def test_model_state_hooks_and_grad_mode_are_restored():
    model = tiny_cnn()
    model.train()
    model[0].weight.requires_grad_(False)
    explainer = build_sise(TinySpec(model))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # callers may be inside no_grad: the gradients are still taken, the mode kept
        maps, logits = explainer(x, [0, 3, 4])
        assert not torch.is_grad_enabled()
    assert maps.shape == (3, 1, 32, 32) and torch.isfinite(maps).all() and maps.max() > 0
    assert hook_count(model) == 0
    assert model.training and all(m.training for m in model.modules())
    assert model[0].weight.requires_grad is False and model[3].weight.requires_grad is True
    assert all(p.grad is None for p in model.parameters())

    def explode(module, inputs, output):
        raise RuntimeError("boom")

    handle = model[10].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explainer(x, [0, 1, 2])
    finally:
        handle.remove()
    assert hook_count(model) == 0 and model.training and torch.is_grad_enabled()
    assert model[3].weight.requires_grad is True
