"""Relevance rules: how one step of the chain passes the relevance R of its output to its input.

A :class:`Rule` is an object with ``relprop(step, R) -> R_in`` (``step.x`` is the recorded input); a
:class:`SumRule` splits the relevance of a skip sum between its two summands. A composite
(:class:`methods.relevance.network.Composite`) picks one rule per step, once, from the step's kind, as
zennit's layer maps do; canonization (BatchNorm merged, skip sums split) lives in the chain, not here.

The LRP rules for affine layers (convolution or linear, BatchNorm merged in) are z-rules,
R_in = sum over terms of input_term * W_term^T (R / z), z the rule's stabilised output:
ZPlus (alpha1-beta0):  z = W+ x+ + b+ + W- x-            (x- = 0 after a ReLU)
AlphaBeta(a, b):       a * [positive part] - b * [negative part], each normalised by its own z
Epsilon:               z = W x + b, stabilised by epsilon
ZBox (input layer):    z = W x - W+ l - W- h, with l / h the lowest / highest input values
The stabiliser adds eps * sign(z) (sign 0 -> +1). These match zennit's ZPlus, AlphaBeta, Epsilon, ZBox.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
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


class Rule(ABC):
    """The relevance rule of a one-input step."""

    @abstractmethod
    def relprop(self, step, relevance: torch.Tensor) -> torch.Tensor:
        """R_in, the relevance of ``step.x``, from the relevance R of the step's output."""


class SumRule(ABC):
    """The relevance rule of a skip sum ReLU(s), s = identity + residual (``step`` records both summands)."""

    @abstractmethod
    def split(self, step, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_identity, R_residual): the relevance of the two summands."""

    def join(self, step, from_skip: torch.Tensor, from_branch: torch.Tensor) -> torch.Tensor:
        """The block input's relevance from what reached it through the skip and through the branch."""
        return from_skip + from_branch


class Pass(Rule):
    """R_in = R (ReLU, Dropout: the canonical LRP choice)."""

    def relprop(self, step, relevance):
        return relevance


def _positive(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _negative(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


def _z_part(step, relevance: torch.Tensor, w_for_pos: torch.Tensor, w_for_neg: torch.Tensor,
            bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x+ W1^T (R/z) + x- W2^T (R/z) for z = W1 x+ + b + W2 x-; when the step's input is known to be >= 0
    (it follows a ReLU), the x- terms, exactly zero, are skipped."""
    op, x = step.op, step.x
    if step.nonnegative_input:
        s = relevance / stabilize(op.forward(x, w_for_pos, bias), eps)
        return x * op.transpose(s, w_for_pos, x.shape)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = op.forward(xp, w_for_pos, bias) + op.forward(xn, w_for_neg, None)
    s = relevance / stabilize(z, eps)
    return xp * op.transpose(s, w_for_pos, x.shape) + xn * op.transpose(s, w_for_neg, x.shape)


class ZPlus(Rule):
    """z+ (alpha1-beta0): R_in = x+ W+^T (R/z) + x- W-^T (R/z), z = W+ x+ + W- x- + b+."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def relprop(self, step, relevance):
        weight = step.weight
        return _z_part(step, relevance, weight.clamp(min=0), weight.clamp(max=0), _positive(step.bias), self.eps)


class AlphaBeta(Rule):
    """alpha * [z+ part] - beta * [z- part], z- = W- x+ + W+ x- + b-, each part normalised by its own z."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, eps: float = 1e-6):
        self.alpha, self.beta, self.eps = alpha, beta, eps

    def relprop(self, step, relevance):
        wp, wn = step.weight.clamp(min=0), step.weight.clamp(max=0)
        return (self.alpha * _z_part(step, relevance, wp, wn, _positive(step.bias), self.eps)
                - self.beta * _z_part(step, relevance, wn, wp, _negative(step.bias), self.eps))


class Epsilon(Rule):
    """epsilon rule: R_in = x W^T (R / (z + eps sign z)), z = W x + b."""

    def __init__(self, eps: float = 0.25):
        self.eps = eps

    def relprop(self, step, relevance):
        x = step.x
        s = relevance / stabilize(step.op.forward(x, step.weight, step.bias), self.eps)
        return x * step.op.transpose(s, step.weight, x.shape)


class ZBox(Rule):
    """z^B for the input layer, the box [l, h] of possible input values:
    R_in = x W^T s - l W+^T s - h W-^T s, s = R / z, z = W x + b - (W+ l + b+) - (W- h + b-)."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor, eps: float = 1e-6):
        self.low, self.high, self.eps = low, high, eps

    def relprop(self, step, relevance):
        op, x, weight, bias, shape = step.op, step.x, step.weight, step.bias, step.x.shape
        low, high = self.low.to(x).expand_as(x), self.high.to(x).expand_as(x)
        wp, wn = weight.clamp(min=0), weight.clamp(max=0)
        z = op.forward(x, weight, bias) - op.forward(low, wp, _positive(bias)) - op.forward(high, wn, _negative(bias))
        s = relevance / stabilize(z, self.eps)
        return x * op.transpose(s, weight, shape) - low * op.transpose(s, wp, shape) - high * op.transpose(s, wn, shape)


class Norm(Rule):
    """Proportional redistribution through a parameter-free linear step (average pooling):
    R_in = x * J^T (R / z), z = step(x) stabilised by eps (zennit's Norm)."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def divide(self, relevance: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return relevance / stabilize(z, self.eps)

    def relprop(self, step, relevance):
        with torch.enable_grad():
            leaf = step.x.detach().requires_grad_(True)
            z = step.apply(leaf)
            (grad,) = torch.autograd.grad(z, leaf, self.divide(relevance, z.detach()))
        return step.x * grad


class WinnerTakesAll(Rule):
    """Relevance routed by the gradient (max pooling: to the maxima)."""

    def relprop(self, step, relevance):
        with torch.enable_grad():
            leaf = step.x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(step.apply(leaf), leaf, relevance)
        return grad


class SkipSum(SumRule):
    """R_identity = identity * R / s, R_residual = residual * R / s, s stabilised by eps (zennit's
    canonized sum with the Norm rule)."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def summands(self, step) -> tuple[torch.Tensor, torch.Tensor]:
        return step.identity, step.residual

    def divide(self, relevance: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return relevance / stabilize(total, self.eps)

    def split(self, step, relevance):
        identity, residual = self.summands(step)
        share = self.divide(relevance, identity + residual)
        return identity * share, residual * share
