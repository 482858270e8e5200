"""Excitation backprop (MWP) and contrastive excitation backprop (c-MWP) against TorchRay 1.0.0.2 (a test-only
peer) on random VGG16 and ResNet50 at TorchRay's benchmark layers, against a hand computation on a tiny
network, and by the conservation of the winning probability."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from methods import build_explainer
from methods.errors import MethodError
from methods.excitation import ContrastiveExcitationBackprop, ExcitationBackprop, default_layer
from models import load_model
from models.spec import ModelSpec

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchray.attribution.excitation_backprop import (
        contrastive_excitation_backprop,
        excitation_backprop,
        update_resnet,
    )

# TorchRay's benchmark layers (examples/attribution_benchmark.py): saliency layer, contrast layer
BENCHMARK = {"vgg16": ("features.23", "classifier.4"), "resnet50": ("layer3", "avgpool")}
TARGETS = [3, 7]


def spec_of(arch: str, dtype=torch.float64) -> ModelSpec:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval().to(dtype)
    cam_layer = "features.29" if arch == "vgg16" else "layer4"
    return ModelSpec(arch, model, cam_layer, tuple(str(i) for i in range(1000)))


@pytest.fixture(scope="module", params=sorted(BENCHMARK))
def benchmark_case(request):
    arch = request.param
    spec = spec_of(arch)
    reference = copy.deepcopy(spec.model)
    if arch == "resnet50":
        reference = update_resnet(reference)  # TorchRay's explicit skip sums
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return arch, spec, reference, x


def torchray_maps(method: str, arch: str, reference: nn.Module, x: torch.Tensor, contrast_layer=None):
    saliency_layer, default_contrast = BENCHMARK[arch]
    maps = []
    for i, target in enumerate(TARGETS):  # TorchRay explains one image at a time
        image = x[i:i + 1].clone()
        if method == "mwp":
            maps.append(excitation_backprop(reference, image, target, saliency_layer))
        else:
            maps.append(contrastive_excitation_backprop(reference, image, target, saliency_layer=saliency_layer,
                                                        contrast_layer=contrast_layer or default_contrast))
    return torch.cat(maps)


@pytest.mark.parametrize("method", ["mwp", "cmwp"])
def test_equals_torchray_at_its_benchmark_layers(method, benchmark_case):
    arch, spec, reference, x = benchmark_case
    explainer = build_explainer(method, spec)
    assert explainer.layer is spec.model.get_submodule(BENCHMARK[arch][0])  # TorchRay's layer by default
    ours, logits = explainer(x, TARGETS)
    expected = torchray_maps(method, arch, reference, x)
    if method == "cmwp":
        ours = ours.clamp(min=0)  # TorchRay's clamp is our final maps' ReLU; the raw map keeps the sign
    assert ours.shape == expected.shape == (2, 1, 4, 4)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    torch.testing.assert_close(logits, spec.model(x))


def test_float32_maps_equal_torchray_to_1e5():
    """In float32 c-MWP is a difference of two nearly equal sums (target and dual both sum to 1), so its
    round-off is relative to the MWP's scale, not to the small difference."""
    arch = "resnet50"
    spec = spec_of(arch, torch.float32)  # the same seeded weights as the float64 model
    reference = update_resnet(copy.deepcopy(spec.model))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for method in ("mwp", "cmwp"):
        ours = build_explainer(method, spec)(x, TARGETS).maps
        expected = torchray_maps(method, arch, reference, x)
        ours = ours.clamp(min=0) if method == "cmwp" else ours
        assert float((ours - expected).abs().max()) < 1e-5 * max(float(expected.abs().max()), 1e-2)


def test_torchray_contrast_layer_does_not_change_the_map(benchmark_case):
    """Our one-pass c-MWP relies on this: every rule is linear in the signal and TorchRay does not clamp the
    contrast, so subtracting the dual at relu7 / avgpool or right below the classifier is the same."""
    arch, _, reference, x = benchmark_case
    other = {"vgg16": "features.30", "resnet50": "layer4"}[arch]
    torch.testing.assert_close(torchray_maps("cmwp", arch, reference, x),
                               torchray_maps("cmwp", arch, reference, x, contrast_layer=other), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("arch", sorted(BENCHMARK))
def test_winning_probability_is_conserved_down_to_the_layer(arch):
    """With non-negative inputs to every convolution (ReLU networks) the rules share P without loss: the MWP
    map at any layer sums to 1, the one-hot start (ResNet's skip shares may be negative but sum to 1)."""
    spec = spec_of(arch)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for layer in ({"vgg16": ("features.16", "features.23"), "resnet50": ("layer1", "layer3")}[arch]):
        maps = ExcitationBackprop(spec.model, layer)(x, TARGETS).maps
        torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def tiny_network() -> nn.Sequential:
    """1x1 convolution (3 -> 2 channels, bias) -> ReLU -> global average pool -> flatten -> linear 2 -> 2."""
    conv, linear = nn.Conv2d(3, 2, 1), nn.Linear(2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0]]).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, -0.25]))
        linear.weight.copy_(torch.tensor([[2.0, -1.0], [1.0, 3.0]]))
        linear.bias.copy_(torch.tensor([0.1, -0.2]))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval().double()


def test_hand_computed_tiny_network():
    model = tiny_network()
    x = torch.tensor([[[[1.0, 2.0]], [[0.5, 0.25]], [[1.0, -0.5]]]], dtype=torch.float64)  # (1, 3, 1, 2)
    # forward by hand: conv -> r (2 channels at 2 positions), ReLU, mean over positions -> a
    w, b = np.array([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0]]), np.array([0.5, -0.25])
    pixels = x[0, :, 0, :].numpy()  # (channel, position)
    r = np.maximum(w @ pixels + b[:, None], 0)  # [[1.5, 2.0], [0.25, 1.75]]
    a = r.mean(axis=1)
    v = np.array([[2.0, -1.0], [1.0, 3.0]])
    for target in (0, 1):
        plus = np.maximum(v[target], 0)
        p_a = plus * a / (plus @ a)  # the linear layer's rule (bias left out)
        p_r = r / r.sum(axis=1, keepdims=True) * p_a[:, None]  # average pooling: shares of the mean
        mwp = ExcitationBackprop(model, "1")(x, [target]).maps
        np.testing.assert_allclose(mwp[0, 0, 0].numpy(), p_r.sum(axis=0), rtol=1e-12)
        minus = np.maximum(-v[target], 0)
        p_dual = minus * a / (minus @ a) if minus.any() else np.zeros(2)
        p_contrast = r / r.sum(axis=1, keepdims=True) * (p_a - p_dual)[:, None]
        cmwp = ContrastiveExcitationBackprop(model, "1")(x, [target]).maps
        np.testing.assert_allclose(cmwp[0, 0, 0].numpy(), p_contrast.sum(axis=0), rtol=1e-12)


def test_model_is_restored_also_after_an_exception():
    spec = spec_of("resnet50", torch.float32)
    explainer = build_explainer("mwp", spec)
    blocks = [m for m in spec.model.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    with pytest.raises(ValueError):
        explainer(torch.randn(1, 3, 64, 64), [10 ** 6 - 1])  # out of range -> MethodError (a ValueError)
    x = torch.randn(1, 3, 0, 64)
    with pytest.raises(RuntimeError):
        explainer.explain(x, torch.tensor([1]))  # an empty image fails inside the forward, within the rules
    assert all("forward" not in block.__dict__ for block in blocks)
    assert not torch._C._is_torch_function_mode_enabled()
    before = spec.model(torch.ones(1, 3, 64, 64))
    explainer(torch.randn(1, 3, 64, 64), [1])
    torch.testing.assert_close(spec.model(torch.ones(1, 3, 64, 64)), before)


def test_default_layers_and_refusals():
    assert default_layer(torchvision.models.vgg11(weights=None)) == "features.15"  # its fourth max pool
    assert default_layer(torchvision.models.resnet18(weights=None)) == "layer3"
    assert default_layer(torchvision.models.densenet121(weights=None)) == "features.denseblock3"
    lite = load_model("efficientnet_lite0", "random")
    assert default_layer(lite.model) == "blocks.10"  # before the last stride-2 block: 14 x 14 at 224 px
    assert build_explainer("mwp", lite, saliency_layer="blocks.5").layer is lite.model.blocks[5]
    with pytest.raises(MethodError, match="^cmwp: excitation backprop needs the model.s residual sums.*MobileNetV2$"):
        build_explainer("cmwp", ModelSpec("mobilenet_v2", torchvision.models.mobilenet_v2(weights=None).eval(),
                                           "features", ("a",)))
    with pytest.raises(MethodError, match="saliency_layer must be a module name"):
        build_explainer("mwp", lite, saliency_layer="")
