"""Map density (Eq. 7-8) on a hand-computed example."""
import math

import torch

from evaluation.map_density import map_density


class MeanModel(torch.nn.Module):
    """Class-1 logit = sum of channel 0; class 0 logit = 0."""

    def forward(self, x):
        score = x[:, 0].sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_density_by_hand():
    x = torch.ones(1, 3, 2, 2)
    maps = torch.tensor([[[[1.0, 0.5], [0.0, 0.5]]]])  # sum 2 of 4 pixels
    positive, negative = map_density(MeanModel(), x, maps, torch.tensor([1]))
    psi_plus = 1 / (1 + math.exp(-2.0))   # channel-0 sum of M*X = 2
    psi_minus = 1 / (1 + math.exp(-2.0))  # channel-0 sum of (1-M)*X = 2
    assert math.isclose(float(positive), psi_plus * 4 / 2.0, rel_tol=1e-6)
    assert math.isclose(float(negative), psi_minus * 4 / 2.0, rel_tol=1e-6)


def test_density_with_an_empty_map_is_nan_not_inf():
    x = torch.ones(2, 3, 2, 2)
    maps = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    positive, negative = map_density(MeanModel(), x, maps, torch.tensor([1, 0]))
    assert math.isnan(float(positive[0])) and math.isfinite(float(negative[0]))
    assert math.isnan(float(negative[1])) and math.isclose(float(positive[1]), 1 / (1 + math.exp(4.0)), rel_tol=1e-5)
