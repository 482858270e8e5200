"""AGF: the delta shift and the |W| rule keep totals, the factorization is the stated ridge regression,
the sharpened target, batches, and a fixed-seed regression value."""
import numpy as np
import pytest
import torch
import torchvision

from methods.relevance import AGF
from methods.relevance.agf import _abs_rule, _cluster_weights, _ones_response, delta_shift, divide, sharpened_target
from methods.relevance.rules import AffineOp


def test_delta_shift_keeps_the_base_total():
    base = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    extra = torch.tensor([[0.5, 9.0, 1.5, 1.0]])
    shifted = delta_shift(base, extra)
    # extra's mean over base's three non-zero entries (12 / 3 = 4) is taken back from each of them
    assert torch.allclose(shifted, torch.tensor([[1.0 + 0.5 - 4, 9.0, 3.0 + 1.5 - 4, 2.0 + 1.0 - 4]]))
    assert torch.isclose(shifted.sum(), base.sum())


def test_abs_rule_is_conservative():
    torch.manual_seed(0)
    op = AffineOp("conv", (1, 1), (1, 1))
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64) + 0.1
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    relevance = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    z = op.forward(x, weight.abs(), None)
    c = x * _abs_rule(op, z, weight.abs(), relevance, x.shape)
    assert torch.allclose(c.flatten(1).sum(1), relevance.flatten(1).sum(1), rtol=1e-6)


@pytest.mark.parametrize("stride,padding,kernel", [((1, 1), (1, 1), 3), ((2, 2), (1, 1), 3), ((2, 2), (0, 0), 1)])
def test_ones_response_sums_channels_into_the_kernel(stride, padding, kernel):
    op = AffineOp("conv", stride, padding)
    weight_abs = torch.randn(5, 4, kernel, kernel, dtype=torch.float64).abs()
    shape = (3, 4, 7, 9)
    full = op.forward(torch.ones(1, 4, 7, 9, dtype=torch.float64), weight_abs, None)
    assert torch.allclose(_ones_response(op, weight_abs, shape), full, rtol=1e-12)
    # borders see fewer kernel taps than the interior, so the response is not a constant
    if padding != (0, 0):
        assert full[0, 0, 0, 0] < full[0, 0, 1, 1]


def test_factorization_solves_the_two_cluster_ridge_regression():
    torch.manual_seed(1)
    hard = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    phi = torch.randn(1, 1, 4, 5, dtype=torch.float64)
    ours = _cluster_weights(hard, phi)
    h = hard[0].reshape(3, -1).numpy()
    pos, neg = (phi[0, 0] > 0).numpy().ravel(), (phi[0, 0] < 0).numpy().ravel()
    reps = np.stack([h[:, neg].sum(1) / neg.sum(), h[:, pos].sum(1) / pos.sum()], axis=1)   # (C, 2)
    weights = np.linalg.solve(reps.T @ reps + np.eye(2), reps.T @ h)                        # ridge, lambda 1
    expected = np.maximum(weights[1], 0) - np.maximum(weights[0], 0)
    assert np.allclose(ours[0, 0].numpy().ravel(), expected)


def test_sharpened_target_and_division():
    logits = torch.tensor([[2.0, 5.0, -1.0]])
    target = torch.tensor([1])
    spread = 6.0  # max |y - y_t|
    expected = torch.softmax(5.0 * torch.exp(-0.5 * ((logits - 5.0) / spread) ** 2), dim=1)
    assert torch.allclose(sharpened_target(logits, target), expected)
    assert int(sharpened_target(logits, target).argmax()) == 1
    assert divide(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0])).tolist() == pytest.approx([0.0, 0.5])


def test_batch_equals_single_images():
    """In float64 to round-off. AGF, like RAP, tests values for exact zero (and the authors' code does
    too), so in float32 round-off can flip masks and a batch can differ from single images."""
    torch.manual_seed(2)
    model = torchvision.models.resnet18().eval().double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    explainer = AGF(model)
    maps, _ = explainer(x, torch.tensor([1, 2, 3]))
    for i in range(3):
        single, _ = explainer(x[i:i + 1], torch.tensor([1 + i]))
        assert torch.allclose(maps[i], single[0], rtol=1e-8, atol=1e-10)


def test_fixed_seed_regression_value():
    torch.manual_seed(6)
    model = torchvision.models.vgg11().eval()
    maps, _ = AGF(model)(torch.randn(1, 3, 64, 64), torch.tensor([7]))
    assert float(maps.abs().sum()) == pytest.approx(REGRESSION_ABS_SUM, rel=1e-3)
    assert float(maps.max()) == pytest.approx(REGRESSION_MAX, rel=1e-3)
    assert float(maps.min()) < 0 < float(maps.max())


REGRESSION_ABS_SUM, REGRESSION_MAX = 3215.78955078125, 2.078814744949341
