"""FullGrad and the gradient / guided backprop / DeconvNet baselines (methods/gradients.py).

FullGrad: completeness of the full-gradient decomposition (input term + bias terms = target logit) and
the saliency map against a literal re-implementation of the authors' code (module backward hooks, biases
matched in reverse order, per-channel upsampling). Baselines: captum's Saliency, GuidedBackprop and
Deconvolution as independent peers (they hook the ReLU modules' backward instead of replacing them).
"""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import Deconvolution, Saliency
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from torch import nn

from methods.errors import MethodError
from methods.gradients import (
    Deconvnet,
    FullGrad,
    GuidedBackprop,
    InputGradient,
    authors_postprocess,
    build_deconv,
    build_fullgrad,
    build_gradient,
    build_guided,
    modified_relus,
)
from models import load_model
from ucag import UCAG

BASELINES = [InputGradient, GuidedBackprop, Deconvnet]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def patched_relus(model):
    return [m for m in model.modules() if "forward" in m.__dict__]


def randomise_batchnorm(model, generator):
    """Non-trivial running statistics and affine parameters, so BatchNorm's effective bias matters."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.5)
    return model


def small_net(inplace=True):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 5))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
    return randomise_batchnorm(net, generator).double().eval()


@pytest.fixture(scope="module")
def spec():
    """A seeded random torchvision resnet18 (in-place ReLU modules, one reused twice per block)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("resnet18", "random")


@pytest.fixture(scope="module")
def resnet18(spec):
    return spec.model


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


TARGETS = torch.tensor([3, 7])


# ---------------------------------------------------------------------------------------------- FullGrad


def test_fullgrad_completeness_small_relu_network():
    net = small_net()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    terms = FullGrad(net).completeness_terms(x, [0, 4, 2])
    with torch.no_grad():
        logits = net(x)
    assert torch.equal(terms.logit, logits[torch.arange(3), torch.tensor([0, 4, 2])])
    assert torch.allclose(terms.input_term + terms.bias_term, terms.logit, rtol=0, atol=1e-8)
    assert terms.bias_term.abs().min() > 1e-3  # the biases carry a real share of the logit


def test_fullgrad_completeness_resnet18_float64(images):
    torch.manual_seed(0)
    model = randomise_batchnorm(torchvision.models.resnet18(), torch.Generator().manual_seed(3))
    model = model.double().eval()
    terms = FullGrad(model).completeness_terms(images.double(), TARGETS)
    total = terms.input_term + terms.bias_term
    assert torch.allclose(total, terms.logit, rtol=1e-6, atol=0)
    assert (terms.bias_term.abs() > 1e-3 * terms.logit.abs()).all()


def authors_fullgrad(model, image, targets, eps=1e-6):
    """The authors' FullGrad.saliency, literally: backward hooks on Conv2d/Linear/BatchNorm2d collect the
    output gradients (in backward order, reversed to match the biases), per-channel bilinear upsampling
    with align_corners=True, only 4-D terms in the map."""
    biases, grads, handles = [], [], []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            handles.append(m.register_full_backward_hook(
                lambda module, gin, gout: grads.append(gout[0]) if module.bias is not None else None))
            if isinstance(m, nn.BatchNorm2d):
                biases.append(-(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)) + m.bias)
            elif m.bias is not None:
                biases.append(m.bias)
    try:
        image = image.clone().requires_grad_()
        out = model(image)
        score = -1.0 * F.nll_loss(out, targets, reduction="sum")
        input_grad = torch.autograd.grad(score, image)[0]
    finally:
        for handle in handles:
            handle.remove()
    cam = authors_postprocess(input_grad * image.detach(), eps).sum(1, keepdim=True)
    for i, b in enumerate(biases):
        g = grads[len(biases) - 1 - i]
        term = g * b.detach().view([1, -1] + [1] * (g.dim() - 2))
        if term.dim() == 4:
            up = F.interpolate(authors_postprocess(term, eps), size=image.shape[2:], mode="bilinear",
                               align_corners=True)
            cam = cam + up.sum(1, keepdim=True)
    return cam


def test_fullgrad_map_equals_authors_algorithm():
    net = small_net(inplace=False)  # full backward hooks refuse in-place ops on hooked outputs
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([1, 3, 0])
    maps, logits = FullGrad(net)(x, targets)
    expected = authors_fullgrad(net, x, targets)
    assert maps.shape == (3, 1, 12, 12) and maps.dtype == torch.float64
    assert torch.allclose(maps, expected, rtol=1e-10, atol=1e-12)
    # the in-place variant of the same weights gives the same map (the recorded outputs stay intact)
    inplace_net = small_net(inplace=True)
    assert torch.allclose(FullGrad(inplace_net)(x, targets).maps, maps, rtol=1e-10, atol=1e-12)


def test_fullgrad_batch_equals_single_images_and_leaves_model_alone(spec, resnet18, images):
    explainer = build_fullgrad(spec)
    before = hook_count(resnet18)
    with torch.no_grad():
        reference = resnet18(images)
        maps, logits = explainer(images, TARGETS)
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and (maps >= 0).all()
    assert torch.allclose(logits, reference, atol=1e-6)
    for i in range(2):
        single, _ = explainer(images[i:i + 1], TARGETS[i:i + 1])
        assert torch.allclose(maps[i], single[0], rtol=1e-5, atol=1e-6)
    predicted, _ = explainer(images)
    assert torch.allclose(predicted, explainer(images, reference.argmax(1)).maps)
    assert hook_count(resnet18) == before
    assert all(p.grad is None for p in resnet18.parameters())
    with pytest.raises(ValueError, match="out of range"):
        explainer(images[:1], [1000])  # raised inside the hooked forward
    assert hook_count(resnet18) == before


def test_fullgrad_options():
    explainer = build_fullgrad(SimpleNamespace(model=small_net()), postprocess_eps=1e-3, align_corners=False)
    assert (explainer.postprocess_eps, explainer.align_corners) == (1e-3, False)
    with pytest.raises(TypeError):
        build_fullgrad(SimpleNamespace(model=small_net()), bogus=1)


# -------------------------------------------------------------------------------- gradient, guided, deconv


def test_gradient_equals_captum_saliency(spec, resnet18, images):
    maps, _ = build_gradient(spec)(images, TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = Saliency(resnet18).attribute(images.clone(), target=TARGETS, abs=True)
    peer = peer.amax(dim=1, keepdim=True)
    assert maps.shape == (2, 1, 64, 64)
    assert torch.allclose(maps, peer, rtol=1e-5, atol=1e-5 * peer.abs().max())


@pytest.mark.parametrize("ours, peer_cls", [(GuidedBackprop, CaptumGuidedBackprop), (Deconvnet, Deconvolution)])
def test_modified_backprop_equals_captum(ours, peer_cls, resnet18, images):
    grads, logits = ours(resnet18).input_gradients(images, TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = peer_cls(resnet18).attribute(images.clone(), target=TARGETS)
    assert torch.allclose(grads, peer, rtol=1e-5, atol=1e-5 * peer.abs().max())
    plain, _ = InputGradient(resnet18).input_gradients(images, TARGETS)
    assert not torch.allclose(grads, plain, rtol=1e-2)  # the rule did change the backward pass
    maps, _ = ours(resnet18)(images, TARGETS)
    assert torch.equal(maps, grads.abs().amax(dim=1, keepdim=True))


@pytest.mark.parametrize("cls", BASELINES)
def test_baselines_batch_equals_single_and_patch_is_undone(cls, resnet18, images):
    relus = [m for m in resnet18.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)
    before = hook_count(resnet18)
    with torch.no_grad():
        reference = resnet18(images)
        maps, logits = cls(resnet18)(images, TARGETS)
    assert torch.allclose(logits, reference, atol=1e-6)
    for i in range(2):
        single, _ = cls(resnet18)(images[i:i + 1], TARGETS[i:i + 1])
        assert torch.allclose(maps[i], single[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="out of range"):
        cls(resnet18)(images[:1], [1000])
    assert patched_relus(resnet18) == [] and hook_count(resnet18) == before
    assert all(p.grad is None for p in resnet18.parameters())
    with torch.no_grad():
        assert torch.equal(resnet18(images), reference)
    # plain gradients after a guided/deconv run: the ReLUs back-propagate normally again
    x = images[:1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(resnet18(x)[0, 3], x)
    plain, _ = InputGradient(resnet18).input_gradients(images[:1], TARGETS[:1])
    assert torch.equal(g, plain)


def test_patch_restores_an_instance_forward_and_survives_exceptions():
    relu = nn.ReLU()
    custom = relu.forward  # a bound method stored on the instance, e.g. by another tool
    relu.forward = custom
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.ReLU6(inplace=True))
    with pytest.raises(KeyError):
        with modified_relus(model, "guided") as patched:
            assert len(patched) == 2 and model[1].forward is not custom
            raise KeyError
    assert model[1].__dict__["forward"] is custom
    assert "forward" not in model[2].__dict__
    with pytest.raises(MethodError, match="rule must be one of guided, deconv"):
        with modified_relus(model, "lrp"):
            raise AssertionError("an unknown rule was accepted")


def test_relu_rules_by_hand_including_relu6_and_inplace():
    """x -> W1 -> ReLU6 -> w2: guided passes relu(w2) where 0 < h < 6, deconv everywhere."""
    lin1 = nn.Linear(4, 5, bias=True).double()
    lin2 = nn.Linear(5, 2, bias=False).double()
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]]))
        lin1.bias.copy_(torch.tensor([0., 0, 0, 0, 0]))
        lin2.weight.copy_(torch.tensor([[1., -1, 2, -2, 3], [0, 0, 0, 0, 0]]))
    x = torch.tensor([[2., -1, 7, 3]], dtype=torch.float64)  # h = [2, -1, 7, 3, 1]
    for inplace in (False, True):
        model = nn.Sequential(lin1, nn.ReLU6(inplace=inplace), lin2)
        w1, w2 = lin1.weight.detach(), lin2.weight.detach()[0]
        with modified_relus(model, "guided"):
            xg = x.clone().requires_grad_(True)
            out = model(xg)
            (guided,) = torch.autograd.grad(out[0, 0], xg)
        mask = torch.tensor([1., 0, 0, 1, 1], dtype=torch.float64)  # 0 < h < 6
        assert torch.allclose(guided[0], w1.t() @ (w2.clamp(min=0) * mask))
        with modified_relus(model, "deconv"):
            xg = x.clone().requires_grad_(True)
            (deconv,) = torch.autograd.grad(model(xg)[0, 0], xg)
        assert torch.allclose(deconv[0], w1.t() @ w2.clamp(min=0))
        assert torch.allclose(out, model(x))  # forward values unchanged


def test_functional_relus_are_not_modified():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(F.relu(self.a(x.flatten(1))))

    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(2, 3, 2, 2)
    plain = InputGradient(model).input_gradients(x, torch.tensor([0, 2]))[0]
    for cls in (GuidedBackprop, Deconvnet):
        assert torch.equal(cls(model).input_gradients(x, torch.tensor([0, 2]))[0], plain)


# ------------------------------------------------------------------------------------------------- UCAG


@pytest.mark.parametrize("builder", [build_fullgrad, build_gradient, build_guided, build_deconv])
def test_methods_run_through_ucag(builder, spec):
    explainer = builder(spec)
    maps, logits = UCAG(explainer, crop=150, n=2, alpha=1.2)(torch.randn(2, 3, 64, 64), [1, 2])
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all()
    assert logits.shape == (2, 1000)
    assert patched_relus(spec.model) == [] and hook_count(spec.model) == 0
    assert all(p.grad is None for p in spec.model.parameters())


def test_fullgrad_counts_relu6_saturation_as_a_bias():
    """ReLU6 is piecewise linear with an implicit bias 6 where it saturates: with clip_biases the
    decomposition stays exact, without it (the authors' layer set) it is not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(inplace=True),
                        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    randomise_batchnorm(net, torch.Generator().manual_seed(5))
    net = net.double().eval()
    x = 8 * torch.randn(2, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = net[:3](x)
    assert (hidden == 6).float().mean() > 0.05  # many units saturate
    terms = FullGrad(net).completeness_terms(x, [0, 3])
    assert torch.allclose(terms.input_term + terms.bias_term, terms.logit, rtol=0, atol=1e-8)
    partial = FullGrad(net, clip_biases=False).completeness_terms(x, [0, 3])
    assert not torch.allclose(partial.input_term + partial.bias_term, partial.logit, rtol=1e-3, atol=1e-3)
    maps, _ = FullGrad(net)(x, [0, 3])
    assert maps.shape == (2, 1, 10, 10) and torch.isfinite(maps).all()
