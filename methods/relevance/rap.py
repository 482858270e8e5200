"""Relative Attributing Propagation (Nam et al., AAAI 2020), following the authors' public implementation.

RAP starts from the one-hot target at the last linear layer and takes every input contribution
c_j = x_j w_tj (plus the bias, shared in proportion to the positive and negative totals) as relevant by
its magnitude: r_j = |c_j| * sum(c) / sum|c| (the total stays the explained logit). Below that layer,
each affine layer splits its output relevance into positive and negative parts and propagates each
through the input's positive contributions (x+ W+, -x+ W-, and the mirror terms for x-), then subtracts
the surplus uniformly from the non-zero input relevances, so totals are kept layer by layer ("shift").
The input layer uses the z^B rule with the image's own lowest and highest values as the box. BatchNorm
passes relevance through (RAP's BatchNorm rule returns R unchanged), convolution biases are ignored
below the last layer, max pooling routes relevance to the maxima, average pooling redistributes it in
proportion to inputs, and a residual sum splits relevance in proportion to its two summands (both
without a stabiliser). The authors' linear and convolutional layers differ in one term (the negative
relevance's first share uses the positive or the negative contribution as denominator); both are kept
as written there. :data:`COMPOSITE` maps the chain's steps to these rules.
"""
from __future__ import annotations

import torch

from methods.relevance.network import Affine, AvgPool, Composite, Dropout, MaxPool, ReLU, Residual
from methods.relevance.rules import (
    AffineOp,
    Norm,
    Pass,
    Rule,
    SkipSum,
    WinnerTakesAll,
    nonzero_mask,
    safe_divide,
    safe_reciprocal,
)


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1).view(-1, *([1] * (t.dim() - 1)))


def shift_to_total(relevance: torch.Tensor, target_total: torch.Tensor) -> torch.Tensor:
    """Subtract the surplus sum(R) - target uniformly from the non-zero entries (RAP's shift)."""
    nonzero = nonzero_mask(relevance)
    shift = safe_divide(_sum(relevance) - target_total, _sum(nonzero))
    return torch.addcmul(relevance, nonzero, shift, value=-1)


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


def _split_propagate(op, relevance: torch.Tensor, x: torch.Tensor, sign: float, weights: tuple,
                     linear_variant: bool) -> torch.Tensor:
    """RAP's propagation through the inputs of one sign (x = x+ with sign 1 or x- with sign -1), with
    z1 = sign * x W+ >= 0 and z2 = -sign * x W- >= 0 and the gradient of z_k with respect to x = ±W_k^T.

    The authors' rule, per output: share2 = z2 / (z1 + z2); R+ goes through z1 and R+ share2 through z2; R-
    goes through z2 with share2 and through z2 (convolutions) or z1 (linear layers) with the rest. They mask
    every z by the non-zero output relevance and each quotient by (z1 + z2 != 0); neither mask changes a
    value (R = 0 gives 0 terms, and z1 + z2 = 0 means z1 = z2 = 0, where every quotient is 0), so the
    quotients are taken as products with 1/z and the four terms summed into two transposed maps."""
    wp, wn = weights
    z1 = op.forward(x, wp, None)
    z2 = op.forward(x, wn, None).neg_()
    if sign < 0:
        z1, z2 = z1.neg_(), z2.neg_()
    share2 = z2 * safe_reciprocal(z1 + z2)
    if linear_variant:
        through1 = relevance * safe_reciprocal(z1)
        through2 = (relevance * share2).mul_(safe_reciprocal(z2))
    else:
        positive = relevance.clamp(min=0)
        through1 = positive * safe_reciprocal(z1)
        through2 = (relevance * share2).add_(relevance - positive).mul_(safe_reciprocal(z2))
    result = x * (op.transpose(through1, wp, x.shape) - op.transpose(through2, wn, x.shape))
    return shift_to_total(result.neg_() if sign < 0 else result, _sum(relevance))


def hidden_propagation(op: AffineOp, x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                       nonnegative: bool = False) -> torch.Tensor:
    """A hidden convolution or linear layer (bias ignored); ``nonnegative``: x >= 0, the x- terms vanish."""
    weights = weight.clamp(min=0), weight.clamp(max=0)
    linear_variant = op.kind == "linear"
    if nonnegative:
        return _split_propagate(op, relevance, x, 1.0, weights, linear_variant)
    return (_split_propagate(op, relevance, x.clamp(min=0), 1.0, weights, linear_variant)
            + _split_propagate(op, relevance, x.clamp(max=0), -1.0, weights, linear_variant))


def input_propagation(op: AffineOp, x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                      divide=safe_divide) -> torch.Tensor:
    """The input layer: z^B with the image's own minimum and maximum as the box (no bias)."""
    shape = x.shape
    low = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1).expand_as(x)
    high = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1).expand_as(x)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    z = op.forward(x, weight, None) - op.forward(low, wp, None) - op.forward(high, wn, None)
    s = divide(relevance, z)
    return x * op.transpose(s, weight, shape) - low * op.transpose(s, wp, shape) - high * op.transpose(s, wn, shape)


class OutputRule(Rule):
    """The output layer: :func:`first_propagation` of the one-hot target (layer's own weight and bias)."""

    def relprop(self, step, relevance):
        return first_propagation(step.x, step.raw_weight, step.raw_bias, relevance)


class HiddenRule(Rule):
    """A hidden convolution or linear layer: :func:`hidden_propagation` (the layer's own weight)."""

    def relprop(self, step, relevance):
        return hidden_propagation(step.op, step.x, step.raw_weight, relevance, nonnegative=step.nonnegative_input)


class ImageBox(Rule):
    """The input layer: :func:`input_propagation`, z^B in the box of the image's own min and max;
    ``divide`` is the method's safe division of R by z."""

    def __init__(self, divide=safe_divide):
        self.divide = divide

    def relprop(self, step, relevance):
        return input_propagation(step.op, step.x, step.raw_weight, relevance, self.divide)


class ExactNorm(Norm):
    """Proportional redistribution without a stabiliser: R / z, 0 where z = 0."""

    def divide(self, relevance, z):
        return safe_divide(relevance, z)


class ExactSkipSum(SkipSum):
    """The skip sum split in proportion to the summands without a stabiliser (0 where the sum is 0)."""

    def divide(self, relevance, total):
        return safe_divide(relevance, total)


COMPOSITE = Composite({Affine: HiddenRule(), ReLU: Pass(), Dropout: Pass(),
                       MaxPool: WinnerTakesAll(), AvgPool: ExactNorm(), Residual: ExactSkipSum()},
                      input_rule=ImageBox(), output_rule=OutputRule())
