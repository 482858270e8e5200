"""LRP family: agreement with zennit, conservation, the skip-sum rule by hand, CLRP/SGLRP properties."""
import copy

import pytest
import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base
from zennit.rules import AlphaBeta, Epsilon, ZBox, ZPlus
from zennit.torchvision import ResNetCanonizer, VGGCanonizer
from zennit.types import Convolution, Linear

from methods import build_explainer
from methods.errors import MethodError
from methods.relevance import CLRP, LRP, SGLRP, network, rules
from methods.relevance.explainers import lrp_rule
from methods.relevance.rules import AffineOp, nonzero_mask, safe_divide, stabilize
from models import load_model
from ucag import UCAG

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
BOUNDS = ((0 - MEAN) / STD, (1 - MEAN) / STD)
ZENNIT_RULES = {"zplus": ZPlus(), "alpha2beta1": AlphaBeta(2.0, 1.0), "epsilon": Epsilon(0.25)}


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return torchvision.models.vgg16().eval()


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    # zennit's canonizer turns a merged BatchNorm into x / sqrt(1 + eps) instead of the identity; with eps = 0
    # on both sides the two canonizations are exact, so the comparison tests the rules and nothing else.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


def zennit_lrp(model, canonizer, rule, x, targets):
    composite = SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, ZENNIT_RULES[rule]), (Linear, ZENNIT_RULES[rule])],
        first_map=[(Convolution, ZBox(*BOUNDS))], canonizers=[canonizer()])
    with torch.no_grad():
        logits = model(x)
    one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, one_hot * logits)
    return relevance.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("rule", list(ZENNIT_RULES))
@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_lrp_equals_zennit(arch, rule, request):
    model = request.getfixturevalue(arch)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    targets = torch.tensor([3, 500])
    ours = LRP(model, BOUNDS, rule=rule, epsilon=0.25)(x, targets).maps
    reference = zennit_lrp(model, VGGCanonizer if arch == "vgg16" else ResNetCanonizer, rule, x, targets)
    assert ours.shape == (2, 1, 224, 224)
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
@pytest.mark.parametrize("rule", ["zplus", "alpha2beta1"])
def test_conservation_without_biases(arch, rule, request):
    """z+ / alpha-beta with z^B at the input conserve relevance when every bias is zero: sum R_input equals
    the explained logit (1e-4 relative; the 1e-6 stabilisers are the only leak)."""
    model = copy.deepcopy(request.getfixturevalue(arch))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.zero_()
            module.bias.data.zero_()
        elif getattr(module, "bias", None) is not None:
            module.bias.data.zero_()
    x = torch.randn(2, 3, 224, 224)
    maps, logits = LRP(model, BOUNDS, rule=rule)(x, torch.tensor([7, 9]))
    explained = logits[[0, 1], [7, 9]]
    assert torch.allclose(maps.flatten(1).sum(1), explained, rtol=1e-4, atol=1e-5 * explained.abs().max())


def test_biases_break_conservation(vgg16):
    """With biases, z+ lets the positive biases absorb part of the relevance: the input total differs."""
    model = copy.deepcopy(vgg16)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.bias.data.fill_(0.05)
    x = torch.randn(1, 3, 224, 224)
    maps, logits = LRP(model, BOUNDS)(x)
    explained = float(logits.max())
    assert abs(float(maps.sum()) - explained) > 0.01 * abs(explained)


def test_two_branch_skip_sum_by_hand():
    """out = relu(x + W x), W = [[1, 2], [0, 1]], x = (1, 2): x + Wx = (1+5, 2+2) = (6, 4).
    With R_out = (6, 4) (= the outputs), the sum gives the skip x * R/s = (1, 2) and the branch Wx * R/s = (5, 2);
    z+ through W sends branch relevance 5 to x in shares (1*1, 2*2)/5 and 2 to x2: R_x = (1 + 1, 2 + 4 + 2)."""
    linear = torch.nn.Linear(2, 2, bias=False)
    linear.weight.data = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    block = network.Residual(network.Chain([network.Linear(linear)]), None)
    network.Composite({network.Linear: rules.ZPlus(eps=0.0), network.Residual: rules.SkipSum(eps=0.0)}).assign(block)
    x = torch.tensor([[1.0, 2.0]])
    out = block.forward(x)
    assert out.tolist() == [[6.0, 4.0]]
    relevance = block.relprop(out)
    assert torch.allclose(relevance, torch.tensor([[2.0, 8.0]]))
    passing = network.Chain([network.Dropout()])
    network.Composite({network.Dropout: rules.Pass()}).assign(passing)
    assert passing.relprop(relevance) is relevance


def test_contrastive_maps_sum_to_zero_and_keep_signs(resnet50):
    x = torch.randn(2, 3, 224, 224)
    for cls in (CLRP, SGLRP):
        maps, _ = cls(resnet50, BOUNDS)(x, torch.tensor([1, 2]))
        totals = maps.flatten(1).sum(1)
        assert torch.allclose(totals, torch.zeros(2), atol=1e-4 * maps.abs().flatten(1).sum(1).max())
        assert float(maps.min()) < 0 < float(maps.max())


def test_sglrp_output_relevance_is_the_softmax_gradient():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    target = torch.tensor([1])
    jacobian = torch.autograd.functional.jacobian(lambda z: torch.softmax(z, 1)[0, 1], logits)[0]
    target_part, others_part = SGLRP.initial_relevance(None, logits, target)
    assert torch.allclose(target_part[0, 1], jacobian[1], atol=1e-7)
    assert torch.allclose(-others_part[0, [0, 2]], jacobian[[0, 2]], atol=1e-7)
    clrp_target, clrp_others = CLRP.initial_relevance(None, logits, target)
    assert clrp_target.tolist() == [[0.0, 2.0, 0.0]] and clrp_others.tolist() == [[1.0, 0.0, 1.0]]


def test_batch_with_targets_equals_single(vgg16):
    x = torch.randn(3, 3, 64, 64)
    explainer = LRP(vgg16, BOUNDS, rule="alpha2beta1")
    maps, _ = explainer(x, torch.tensor([4, 5, 6]))
    for i in range(3):
        single, _ = explainer(x[i:i + 1], torch.tensor([4 + i]))
        assert torch.allclose(maps[i], single[0], rtol=1e-4, atol=1e-6 * maps.abs().max())


def test_unsupported_architectures_are_named(lite):
    with pytest.raises(MethodError, match="support torchvision VGG .* and ResNet .* not EfficientNetLite0"):
        build_explainer("lrp", lite)
    with pytest.raises(MethodError, match="not Inception3"):
        build_explainer("rap" if False else "clrp", load_model("inception_v3", "random"))


@pytest.mark.parametrize("method", ["lrp", "clrp", "sglrp", "rap", "rsp", "agf"])
def test_every_relevance_method_runs_through_ucag(method):
    torch.manual_seed(0)
    spec = load_model("resnet18", "random")
    explainer = build_explainer(method, spec)
    maps, _ = UCAG(explainer, crop=150, n=2, alpha=1.2)(torch.randn(2, 3, 64, 64), [1, 2])
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and explainer.signed


def test_mask_helpers_equal_their_where_forms():
    values = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-9])
    numerator = torch.tensor([1.0, 2.0, -3.0, 4.0, 6.0, 5.0])
    assert torch.equal(nonzero_mask(values), (values != 0).float())
    assert torch.equal(safe_divide(numerator, values), torch.where(values != 0, numerator / values, 0.0))
    expected = values + 1e-6 * torch.where(values >= 0, 1.0, -1.0)
    assert torch.equal(stabilize(values, 1e-6), expected)


@pytest.mark.parametrize("kernel,stride,padding,size", [(1, 2, 0, 56), (1, 2, 0, 57), (1, 3, 0, 10), (1, 1, 0, 9),
                                                        (3, 2, 1, 15), (7, 2, 3, 32)])
def test_affine_transpose_is_the_input_gradient(kernel, stride, padding, size):
    torch.manual_seed(0)
    op = AffineOp("conv", (stride, stride), (padding, padding))
    weight = torch.randn(6, 4, kernel, kernel, dtype=torch.float64)
    x = torch.randn(2, 4, size, size + 1, dtype=torch.float64, requires_grad=True)
    out = op.forward(x, weight, None)
    s = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, s)
    assert torch.allclose(op.transpose(s, weight, x.shape), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["zplus", "alpha2beta1"])
def test_signed_input_terms_equal_zennit(rule):
    """On a layer whose input may be negative (no ReLU before it) the z+ and alpha-beta rules add the x- terms:
    one convolution with signed input and biases, against zennit's rule on the same layer."""
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    relevance = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    step = network.Conv(conv)
    step.input_layer = True  # reads the image: its input is signed
    network.Composite({network.Conv: lrp_rule(rule, 0.25)}).assign(step)
    step.forward(x)
    ours = step.relprop(relevance)
    composite = LayerMapComposite(layer_map=[(Convolution, ZENNIT_RULES[rule])])
    with Gradient(model=torch.nn.Sequential(conv), composite=composite) as attributor:
        _, reference = attributor(x, relevance)
    assert bool((x < 0).any())
    assert torch.allclose(ours, reference, rtol=1e-8, atol=1e-10)


def test_a_step_without_a_rule_refuses():
    """A composite maps step kinds to rules; a step it does not map (RSP has no linear-layer rule) raises."""
    step = network.Linear(torch.nn.Linear(2, 2))
    network.Composite({network.Conv: rules.ZPlus()}).assign(step)
    step.forward(torch.ones(1, 2))
    with pytest.raises(MethodError, match="no rule for Linear steps"):
        step.relprop(torch.ones(1, 2))
