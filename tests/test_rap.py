"""RAP: the properties its paper states (conservation, relevant/irrelevant separation, the shift that
keeps totals), the first propagation by hand, and a fixed-seed regression value."""
import pytest
import torch
import torchvision

from methods import build_explainer
from methods.errors import MethodError
from methods.relevance import RAP
from methods.relevance.rap import first_propagation, hidden_propagation, shift_to_total
from methods.relevance.rules import AffineOp
from models import load_model


def test_first_propagation_by_hand():
    """x = (1, 2, 0.5), w_t = (2, -1, 1), b_t = 0.5: contributions (2, -2, 0.5); positive total 2.5,
    negative -2, so the bias goes 2.5 to the positive and -2 to the negative contributions: (4, -4, 1),
    sum 1 = logit; RAP keeps magnitudes, rescaled to that sum: (4, 4, 1) / 9."""
    x = torch.tensor([[1.0, 2.0, 0.5]])
    weight = torch.tensor([[2.0, -1.0, 1.0], [0.3, 0.3, 0.3]])
    bias = torch.tensor([0.5, -1.0])
    one_hot = torch.tensor([[1.0, 0.0]])
    relevance = first_propagation(x, weight, bias, one_hot)
    assert torch.allclose(relevance, torch.tensor([[4.0, 4.0, 1.0]]) / 9)
    assert torch.allclose(relevance.sum(), x @ weight[0] + bias[0])


def test_shift_keeps_totals():
    relevance = torch.tensor([[[[1.0, 0.0], [2.0, 3.0]]]])
    shifted = shift_to_total(relevance, torch.tensor(3.0).view(1, 1, 1, 1))
    assert torch.allclose(shifted, torch.tensor([[[[0.0, 0.0], [1.0, 2.0]]]]))  # zeros stay zero
    torch.manual_seed(0)
    op = AffineOp("conv", (1, 1), (1, 1))
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    out_relevance = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    propagated = hidden_propagation(op, x, torch.randn(5, 4, 3, 3, dtype=torch.float64), out_relevance)
    assert torch.allclose(propagated.flatten(1).sum(1), out_relevance.flatten(1).sum(1))


@pytest.mark.parametrize("arch,dtype,rtol", [("vgg16", torch.float32, 1e-4), ("resnet50", torch.float64, 1e-8)])
def test_rap_conserves_the_explained_logit(arch, dtype, rtol):
    """The input map sums to the target logit (float32 round-off in ResNet50's many shifts is ~1e-3,
    hence float64 there)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch).eval().to(dtype)
    x = torch.randn(2, 3, 224, 224, dtype=dtype)
    maps, logits = RAP(model)(x, torch.tensor([3, 8]))
    assert torch.allclose(maps.flatten(1).sum(1).to(dtype), logits[[0, 1], [3, 8]], rtol=rtol)


def test_relevant_and_irrelevant_parts_are_separated():
    """After the first propagation every unit carries relevance of one sign (magnitudes); below, the
    positive and negative parts travel separately, so the input map holds both signs."""
    torch.manual_seed(1)
    model = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = torch.flatten(model.avgpool(model.features(x)), 1)
        hidden = model.classifier[:-1](features)
        logit = model(x)[0, 5]
    first = first_propagation(hidden, model.classifier[-1].weight, model.classifier[-1].bias,
                              torch.nn.functional.one_hot(torch.tensor([5]), 1000).float())
    assert bool((first * torch.sign(logit) >= 0).all())
    maps, _ = RAP(model)(x, torch.tensor([5]))
    assert float(maps.min()) < 0 < float(maps.max())


def test_fixed_seed_regression_value():
    torch.manual_seed(3)
    model = torchvision.models.vgg11().eval()
    maps, logits = RAP(model)(torch.randn(1, 3, 64, 64), torch.tensor([7]))
    assert float(maps.abs().sum()) == pytest.approx(0.21961751580238342, rel=1e-4)
    assert float(maps[0, 0, 40, 33]) == pytest.approx(-0.0001328483340330422, rel=1e-3)
    assert float(maps.sum()) == pytest.approx(float(logits[0, 7]), rel=1e-4)


def test_rap_batch_equals_single():
    """In float64 a batch equals one image at a time to round-off. (In float32 it does not: RAP's masks
    test values for exact zero, and float32 round-off flips some of them; the published code has the same
    sensitivity.)"""
    torch.manual_seed(2)
    model = torchvision.models.resnet18().eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    explainer = RAP(model)
    maps, _ = explainer(x, torch.tensor([1, 2]))
    for i in range(2):
        single, _ = explainer(x[i:i + 1], torch.tensor([1 + i]))
        assert torch.allclose(maps[i], single[0], rtol=1e-8, atol=1e-10)


def test_rap_refuses_inception():
    with pytest.raises(MethodError, match="support torchvision VGG .* not Inception3"):
        build_explainer("rap", load_model("inception_v3", "random"))


def _literal_hidden_propagation(op, x, weight, relevance):
    """RAP's hidden-layer rule written term by term as in the authors' code: every z masked by the non-zero
    output relevance, four safe-divided terms per input sign, masked transposes, then the total shift."""
    def divide(a, b):
        return torch.where(b != 0, a / torch.where(b != 0, b, 1.0), 0.0)

    nonzero = (relevance != 0).to(x.dtype)
    positive, negative = relevance.clamp(min=0), relevance.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    linear = op.kind == "linear"
    result = torch.zeros_like(x)
    for xs, sign1 in ((x.clamp(min=0), 1.0), (x.clamp(max=0), -1.0)):
        z1 = sign1 * op.forward(xs, wp, None) * nonzero
        z2 = -sign1 * op.forward(xs, wn, None) * nonzero
        total = z1 + z2
        alive = (total != 0).to(x.dtype)
        share2 = divide(z2, total)
        through1 = divide(positive * alive, z1)
        through2 = divide(positive * share2, z2) + divide(negative * share2, z2)
        if linear:
            through1 = through1 + divide(negative * alive, z1)
        else:
            through2 = through2 + divide(negative * alive, z2)
        back = op.transpose(through1 * nonzero, wp, x.shape) - op.transpose(through2 * nonzero, wn, x.shape)
        result = result + shift_to_total(
            xs * sign1 * back,
            relevance.flatten(1).sum(1).view(-1, *([1] * (x.dim() - 1))))
    return result


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_hidden_propagation_equals_the_literal_rule(kind, nonnegative):
    torch.manual_seed(3)
    if kind == "conv":
        op = AffineOp("conv", (1, 1), (1, 1))
        x, weight, relevance = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(2, 5, 6, 6)
    else:
        op = AffineOp("linear")
        x, weight, relevance = torch.randn(2, 7), torch.randn(5, 7), torch.randn(2, 5)
    x, weight, relevance = x.double(), weight.double(), relevance.double()
    x = x.clamp(min=0) if nonnegative else x
    x[..., 0] = 0.0                       # inputs with zero z, and output relevance with zeros
    relevance[..., -1] = 0.0
    ours = hidden_propagation(op, x, weight, relevance, nonnegative=nonnegative)
    assert torch.allclose(ours, _literal_hidden_propagation(op, x, weight, relevance), rtol=1e-10, atol=1e-12)
