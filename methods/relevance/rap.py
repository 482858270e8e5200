"""Relative Attributing Propagation (Nam et al., AAAI 2020), following the authors' public implementation.

RAP starts from the one-hot target at the last linear layer and takes every input contribution
c_j = x_j w_tj (plus the bias, shared in proportion to the positive and negative totals) as relevant by
its magnitude: r_j = |c_j| * sum(c) / sum|c| (the total stays the explained logit). Below that layer,
each affine layer splits its output relevance into positive and negative parts and propagates each
through the input's positive contributions (x+ W+, -x+ W-, and the mirror terms for x-), then subtracts
the surplus uniformly from the non-zero input relevances, so totals are kept layer by layer ("shift").
The input layer uses the z^B rule with the image's own lowest and highest values as the box. BatchNorm
passes relevance through (RAP's BatchNorm rule returns R unchanged), convolution biases are ignored
below the last layer, pooling redistributes in proportion to inputs, and a residual sum splits
relevance in proportion to its two summands. The authors' linear and convolutional layers differ in one
term (the negative relevance's first share uses the positive or the negative contribution as
denominator); both are kept as written there.
"""
from __future__ import annotations

import torch

from methods.relevance.rules import AffineOp


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (the inf/nan there are masked out)."""
    return torch.where(denominator != 0, numerator / denominator, 0.0)


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1).view(-1, *([1] * (t.dim() - 1)))


def shift_to_total(relevance: torch.Tensor, target_total: torch.Tensor) -> torch.Tensor:
    """Subtract the surplus sum(R) - target uniformly from the non-zero entries (RAP's shift)."""
    nonzero = (relevance != 0).to(relevance.dtype)
    shift = safe_divide(_sum(relevance) - target_total, _sum(nonzero))
    return relevance - shift * nonzero


def first_propagation(x: torch.Tensor, weight: torch.Tensor, bias, one_hot: torch.Tensor) -> torch.Tensor:
    """Last linear layer: contributions x_j w_tj and the bias share, redistributed by magnitude."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    terms = {}
    for name, (xs, ws) in {"pp": (xp, wp), "pn": (xp, wn), "np": (xn, wp), "nn": (xn, wn)}.items():
        z = xs @ ws.t()
        # S = (z * onehot) / z = onehot where z != 0: each term's contributions to the target output
        terms[name] = (z, xs * (safe_divide(z * one_hot, z) @ ws))
    contributions = sum(c for _, c in terms.values())
    if bias is not None:
        positive = _sum(terms["pp"][0] * one_hot + terms["nn"][0] * one_hot)
        negative = _sum(terms["pn"][0] * one_hot + terms["np"][0] * one_hot)
        target_bias = bias * one_hot
        for name, share in (("pp", safe_divide(positive, positive + negative)),
                            ("pn", safe_divide(negative, positive + negative))):
            z = terms[name][0]
            weights = wp if name == "pp" else wn
            contributions = contributions + xp * (safe_divide(target_bias * share, z) @ weights)
    positive_part, negative_part = contributions.clamp(min=0), contributions.clamp(max=0)
    scale = safe_divide(_sum(positive_part + negative_part), _sum(positive_part - negative_part))
    return (positive_part - negative_part) * scale


def _split_propagate(op, relevance: torch.Tensor, x: torch.Tensor, first: tuple, second: tuple,
                     linear_variant: bool) -> torch.Tensor:
    """RAP's propagation through one input sign. ``first`` and ``second`` are (z, weight, sign) with
    z = sign * x W >= 0; the gradient of z with respect to x is sign * W^T."""
    shape = x.shape
    (z1, w1, sign1), (z2, w2, sign2) = first, second
    total = z1 + z2
    positive, negative = relevance.clamp(min=0), relevance.clamp(max=0)
    alive = (total != 0).to(relevance.dtype)

    share2 = safe_divide(z2, total)
    # terms through the same weights are summed before the (linear) transposed map: two maps, not four
    through1 = safe_divide(positive * alive, z1)
    through2 = safe_divide(positive * share2, z2) + safe_divide(negative * share2, z2)
    if linear_variant:
        through1 = through1 + safe_divide(negative * alive, z1)
    else:
        through2 = through2 + safe_divide(negative * alive, z2)
    result = x * (op.transpose(through1, w1, shape) * sign1 + op.transpose(through2, w2, shape) * sign2)
    return shift_to_total(result, _sum(relevance))


def hidden_propagation(op: AffineOp, x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                       nonnegative: bool = False) -> torch.Tensor:
    """A hidden convolution or linear layer (bias ignored); ``nonnegative``: x >= 0, the x- terms vanish."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    nonzero = (relevance != 0).to(relevance.dtype)
    linear_variant = op.kind == "linear"
    # the authors multiply each z by the mask of non-zero output relevance, so the transposes mask too
    masked = _MaskedOp(op, nonzero)
    za1, za2 = op.forward(xp, wp, None) * nonzero, -op.forward(xp, wn, None) * nonzero
    result = _split_propagate(masked, relevance, xp, (za1, wp, 1.0), (za2, wn, -1.0), linear_variant)
    if not nonnegative:
        zb1, zb2 = -op.forward(xn, wp, None) * nonzero, op.forward(xn, wn, None) * nonzero
        result = result + _split_propagate(masked, relevance, xn, (zb1, wp, -1.0), (zb2, wn, 1.0), linear_variant)
    return result


class _MaskedOp:
    """An affine op whose output is multiplied by a fixed mask: the transpose masks its input first."""

    def __init__(self, op: AffineOp, mask: torch.Tensor):
        self.op, self.mask, self.kind = op, mask, op.kind

    def transpose(self, s, weight, shape):
        return self.op.transpose(s * self.mask, weight, shape)


def input_propagation(op: AffineOp, x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                      divide=None) -> torch.Tensor:
    """The input layer: z^B with the image's own minimum and maximum as the box (no bias)."""
    shape = x.shape
    low = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1).expand_as(x)
    high = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1).expand_as(x)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    z = op.forward(x, weight, None) - op.forward(low, wp, None) - op.forward(high, wn, None)
    s = (divide or safe_divide)(relevance, z)
    return x * op.transpose(s, weight, shape) - low * op.transpose(s, wp, shape) - high * op.transpose(s, wn, shape)
