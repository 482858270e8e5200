"""RSP: conservation from its Grad-CAM start, sectional propagation of the two signs, per-image section
kernels (a batch equals single images), and a fixed-seed regression value."""
import pytest
import torch
import torchvision

from methods.relevance import RSP
from methods.relevance.network import RelevanceNet
from methods.relevance.rsp import COMPOSITE, gradcam_terms, hidden_propagation, per_sample_weight_gradient
from methods.relevance.rules import AffineOp


def start_relevance(model, x, targets):
    net = RelevanceNet(model, COMPOSITE)
    net.forward(x)
    terms = gradcam_terms(net, targets)
    return terms / (terms.flatten(1).max(dim=1).values.view(-1, 1, 1, 1) + 1e-9)


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_rsp_conserves_its_gradcam_start(arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch).eval().double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    targets = torch.tensor([3, 8])
    maps, _ = RSP(model)(x, targets)
    start = start_relevance(model, x, targets)
    assert start.shape[-1] in (14, 7)  # the end of the last convolutional block
    assert torch.allclose(maps.flatten(1).sum(1), start.flatten(1).sum(1), rtol=1e-9)
    assert float(maps.min()) < 0 < float(maps.max())


def test_section_kernels_are_per_image_weight_gradients():
    torch.manual_seed(1)
    op = AffineOp("conv", (1, 1), (1, 1))
    x, grad_output = torch.rand(3, 4, 6, 6), torch.rand(3, 5, 6, 6)
    kernels = per_sample_weight_gradient(op, x, grad_output, torch.Size([5, 4, 3, 3])).view(3, 5, 4, 3, 3)
    for i in range(3):
        weight = torch.zeros(5, 4, 3, 3, requires_grad=True)
        (reference,) = torch.autograd.grad((torch.conv2d(x[i:i + 1], weight, padding=1) * grad_output[i:i + 1]).sum(),
                                           weight)
        assert torch.allclose(kernels[i], reference, atol=1e-5)


def test_signs_travel_in_their_own_sections():
    """A 1x1 convolution (no shift) sends positive relevance only to positive inputs and keeps its total;
    a 3x3 one keeps the total through the shift."""
    torch.manual_seed(2)
    x = torch.rand(2, 4, 5, 5, dtype=torch.float64)
    relevance = torch.rand(2, 6, 5, 5, dtype=torch.float64)
    pointwise = hidden_propagation(AffineOp("conv"), x, torch.randn(6, 4, 1, 1, dtype=torch.float64), relevance)
    assert bool((pointwise >= 0).all())
    assert torch.allclose(pointwise.flatten(1).sum(1), relevance.flatten(1).sum(1))
    negative = hidden_propagation(AffineOp("conv"), x, torch.randn(6, 4, 1, 1, dtype=torch.float64), -relevance)
    assert bool((negative <= 0).all())
    signed = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    spatial = hidden_propagation(AffineOp("conv", (1, 1), (1, 1)), x, torch.randn(6, 4, 3, 3, dtype=torch.float64),
                                 signed)
    assert torch.allclose(spatial.flatten(1).sum(1), signed.flatten(1).sum(1))


def test_batch_equals_single_images():
    torch.manual_seed(3)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(3, 3, 64, 64)
    explainer = RSP(model)
    maps, _ = explainer(x, torch.tensor([1, 2, 3]))
    for i in range(3):
        single, _ = explainer(x[i:i + 1], torch.tensor([1 + i]))
        assert torch.allclose(maps[i], single[0], rtol=1e-4, atol=1e-5 * maps[i].abs().max())


def test_fixed_seed_regression_value():
    torch.manual_seed(4)
    model = torchvision.models.vgg11().eval()
    maps, _ = RSP(model)(torch.randn(1, 3, 64, 64), torch.tensor([7]))
    assert float(maps.abs().sum()) == pytest.approx(REGRESSION_ABS_SUM, rel=1e-3)
    assert float(maps.sum()) == pytest.approx(REGRESSION_SUM, rel=1e-3)


REGRESSION_ABS_SUM, REGRESSION_SUM = 1317.1373291015625, 19.430397033691406


@pytest.mark.parametrize("c_in,c_out,size", [(4, 3, 6),     # section kernels (C_out x C_in) are cheaper
                                             (16, 12, 4)])  # the L x L Gram matrix is cheaper
def test_pointwise_fast_path_equals_grouped_convolutions(c_in, c_out, size):
    torch.manual_seed(5)
    x = torch.rand(2, c_in, size, size, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0                                                  # a pixel with z = 0
    weight = torch.randn(c_out, c_in, 1, 1, dtype=torch.float64)
    relevance = torch.randn(2, c_out, size // 2, size // 2, dtype=torch.float64)
    relevance[1, 0] = 0.0
    fast = hidden_propagation(AffineOp("conv", stride=(2, 2)), x, weight, relevance)
    # dilation does not change a 1x1 convolution but sends it down the grouped-convolution path
    general = hidden_propagation(AffineOp("conv", stride=(2, 2), dilation=(2, 2)), x, weight, relevance)
    assert torch.allclose(fast, general, atol=1e-12)
