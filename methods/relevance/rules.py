"""LRP rules for affine layers (convolution or linear, BatchNorm already merged in), as z-rules:
R_in = sum over terms of input_term * f^T(R / z), with z the rule's stabilised output.

zplus (alpha1-beta0): z = W+ x+ + b+ + W- x-            (x- = 0 after a ReLU)
alphabeta(a, b):      a * [positive part] - b * [negative part], each normalised by its own z
epsilon:              z = W x + b, stabilised by epsilon
zbox (input layer):   z = W x - W+ l - W- h, with l / h the lowest / highest input values
The stabiliser adds eps * sign(z) (sign 0 -> +1). These match zennit's ZPlus, AlphaBeta, Epsilon, ZBox.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """1 where t != 0 and 0 elsewhere, in t's dtype. Masks are multiplied in throughout the relevance code:
    on CPU a float mask from sign() costs a fraction of a bool mask or of torch.where."""
    return t.sign().abs_()


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where the denominator is 0 (zeros become 1 before dividing, so no
    inf/nan appears, then the mask is multiplied in: the same values as masking the quotient)."""
    nonzero = nonzero_mask(denominator)
    return (numerator / (denominator + (1 - nonzero))).mul_(nonzero)


def safe_reciprocal(t: torch.Tensor) -> torch.Tensor:
    """1 / t, and 0 where t == 0 (a quotient by t with many numerators becomes a product)."""
    nonzero = nonzero_mask(t)
    return nonzero.div_(t + (1 - nonzero))


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) taken as +1."""
    sign = z.sign()
    return z + eps * sign.add_(1 - sign.abs())


@dataclass
class AffineOp:
    """An affine layer's forward and transposed (input-gradient) maps for given parameters."""

    kind: str  # "conv" or "linear"
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        if self.kind == "linear":
            return s @ weight
        if self._pointwise(weight):
            # a 1x1 convolution's transpose is W^T applied at every pixel: one batched matrix product
            # (up to 5x faster on CPU than convolution_backward); a strided one (ResNet's downsampling
            # skip) read only every stride-th pixel, so the product is written back onto those pixels
            out = (weight[:, :, 0, 0].t() @ s.flatten(2)).view(s.shape[0], weight.shape[1], *s.shape[2:])
            if tuple(self.stride) == (1, 1):
                return out
            full = s.new_zeros(input_shape)
            full[..., ::self.stride[0], ::self.stride[1]] = out
            return full
        return torch.nn.grad.conv2d_input(input_shape, weight, s, self.stride, self.padding, self.dilation, self.groups)

    def _pointwise(self, weight: torch.Tensor) -> bool:
        return (weight.shape[2:] == (1, 1) and tuple(self.padding) == (0, 0) and tuple(self.dilation) == (1, 1)
                and self.groups == 1)


@dataclass(frozen=True)
class Rule:
    """name: 'zplus', 'alphabeta', 'epsilon' or 'zbox'; alpha/beta for alphabeta; eps is the stabiliser
    (the epsilon of the epsilon rule)."""

    name: str = "zplus"
    alpha: float = 2.0
    beta: float = 1.0
    eps: float = 1e-6


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


def affine_relevance(op: AffineOp, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     relevance: torch.Tensor, rule: Rule,
                     bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                     nonnegative: bool = False) -> torch.Tensor:
    """Relevance of the layer input ``x`` given the relevance of its output.

    nonnegative: ``x`` is known to be >= 0 (it follows a ReLU), so the x- terms, exactly zero, are skipped.
    """
    shape = x.shape
    if rule.name == "epsilon":
        s = relevance / stabilize(op.forward(x, weight, bias), rule.eps)
        return x * op.transpose(s, weight, shape)
    if rule.name == "zbox":
        low, high = (b.to(x).expand_as(x) for b in bounds)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        z = op.forward(x, weight, bias) - op.forward(low, wp, _pos(bias)) - op.forward(high, wn, _neg(bias))
        s = relevance / stabilize(z, rule.eps)
        return x * op.transpose(s, weight, shape) - low * op.transpose(s, wp, shape) - high * op.transpose(s, wn, shape)
    xp, xn = (x, None) if nonnegative else (x.clamp(min=0), x.clamp(max=0))
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)

    def part(w_for_pos: torch.Tensor, w_for_neg: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if nonnegative:
            s = relevance / stabilize(op.forward(xp, w_for_pos, b), rule.eps)
            return xp * op.transpose(s, w_for_pos, shape)
        z = op.forward(xp, w_for_pos, b) + op.forward(xn, w_for_neg, None)
        s = relevance / stabilize(z, rule.eps)
        return xp * op.transpose(s, w_for_pos, shape) + xn * op.transpose(s, w_for_neg, shape)

    if rule.name == "zplus":
        return part(wp, wn, _pos(bias))
    if rule.name == "alphabeta":
        return rule.alpha * part(wp, wn, _pos(bias)) - rule.beta * part(wn, wp, _neg(bias))
    raise ValueError(f"unknown LRP rule '{rule.name}'")


def norm_relevance(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, relevance: torch.Tensor,
                   eps: float = 1e-6, exact: bool = False) -> torch.Tensor:
    """Proportional redistribution through a parameter-free linear map (sum or average pooling).

    exact: divide without a stabiliser (0 where the output is 0), as RAP does.
    """
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        z = forward(leaf)
        detached = z.detach()
        if exact:
            share = safe_divide(relevance, detached)
        else:
            share = relevance / stabilize(detached, eps)
        (grad,) = torch.autograd.grad(z, leaf, share)
    return x * grad


def gradient_relevance(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       relevance: torch.Tensor) -> torch.Tensor:
    """Relevance routed by the gradient (max pooling: winner takes all)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(forward(leaf), leaf, relevance)
    return grad
