"""Attribution Guided Factorization (Gur, Ali and Wolf, AAAI 2021), following the authors' public code.

Two streams run from the output to the input. The gradient stream is plain backpropagation of a
sharpened target, y' = softmax(y_t * exp(-((y - y_t) / s)^2 / 2)) with s = max |y - y_t|. The relevance
stream starts as x * dy'_t/dx at the last layer and, at every hidden convolution, combines
  C   = |x| |W|-rule redistribution of the incoming relevance (conservative),
  M   = ReLU(channel mean of x * grad), scaled to max 1,
  F_x, F_dx = ReLU'd foreground-background factorization of the sigmoid-"hard" activations and gradients
        (a 2-cluster ridge regression on representatives taken where mean(C) is positive or negative),
  A   = the |W|-rule redistribution of the relevance onto an input of ones,
into R = (F_x + M) / (1 + exp(-C)) + F_dx + A, added to C with a shift that keeps C's total ("delta
shift"). Pooling, ReLU and skip sums redistribute in proportion to their inputs, BatchNorm and Dropout pass
relevance through, the first linear layer after the flattening adds M, and the input layer uses z^B with
the image's own minimum and maximum. The final map is divided by its maximum. :data:`COMPOSITE` maps the
chain's steps to these rules; they read the gradient stream at each step's output (``output_gradient``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.relevance.network import (
    AvgPool,
    Composite,
    Conv,
    Dropout,
    Linear,
    MaxPool,
    RelevanceNet,
    ReLU,
    Residual,
    walk,
)
from methods.relevance.rap import ImageBox
from methods.relevance.rules import AffineOp, Pass, Rule, SumRule, nonzero_mask


def divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AGF's safe division, a / (b + 1e-9) and 0 where b == 0. (The authors write the denominator as
    b.clamp(min=1e-9) + b.clamp(max=1e-9), which is b + 1e-9 for every b.)"""
    return (a * nonzero_mask(b)).div_(b + 1e-9)


def sample_max(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).max(dim=1).values.view(-1, *([1] * (t.dim() - 1)))


def delta_shift(base: torch.Tensor, extra: torch.Tensor, nonzero=None) -> torch.Tensor:
    """base + extra - mean(extra) over base's non-zero entries: the total of ``base`` is kept."""
    nonzero = nonzero_mask(base) if nonzero is None else nonzero
    dims = list(range(1, extra.dim()))
    mean = extra.sum(dim=dims, keepdim=True) / nonzero.sum(dim=dims, keepdim=True)
    return torch.addcmul(base + extra, nonzero, mean, value=-1)


def sharpened_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """y' = softmax(y_t * exp(-0.5 ((y - y_t) / s)^2)), s = max |y - y_t| (the start of both streams)."""
    target_logit = logits.gather(1, targets[:, None])
    spread = (logits - target_logit).abs().max(dim=1, keepdim=True).values
    return torch.softmax(target_logit * torch.exp(-0.5 * ((logits - target_logit) / spread) ** 2), dim=1)


def _cluster_weights(hard: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """W1 - W0 of the ridge regression (R^T R + I)^-1 R^T H, R = per-channel representatives of the
    positive and negative regions of phi, H = the hard map; ReLU'd as the authors do."""
    batch, channels = hard.shape[:2]
    flat = hard.reshape(batch, channels, -1)
    regions = torch.stack([phi < 0, phi > 0], dim=-1).to(hard.dtype).reshape(batch, -1, 2)  # (B, HW, 2)
    reps = divide(flat @ regions, regions.sum(dim=1, keepdim=True))        # (B, C, 2): negative, positive
    gram = reps.transpose(1, 2) @ reps + torch.eye(2, dtype=hard.dtype, device=hard.device)
    # solve_ex: the same solution as linalg.solve without its singularity check, a host sync per call on an
    # accelerator; gram = R^T R + I is positive definite, never singular
    weights = torch.linalg.solve_ex(gram, reps.transpose(1, 2) @ flat).result
    weights = F.relu(weights.reshape(batch, 2, *hard.shape[2:]))
    return weights[:, 1:2] - weights[:, 0:1]


def _hardness(t: torch.Tensor) -> torch.Tensor:
    """10 / max(t) per image (0 where the max is 0): sigmoid(10 * t / max) in one multiply."""
    peak = sample_max(t)
    return torch.where(peak != 0, 10 / (peak + 1e-9), 0.0)


def factorization(x: torch.Tensor, grad: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_x, F_dx), (B, 1, H, W): foreground-minus-background weights of the activations and gradients."""
    grad_hard = (grad * _hardness(grad)).sigmoid_()
    x_hard = (x * _hardness(x)).sigmoid_()
    return _cluster_weights(x_hard, phi), _cluster_weights(grad_hard, phi)


def _abs_rule(op: AffineOp, z: torch.Tensor, weight_abs: torch.Tensor, relevance: torch.Tensor,
              shape) -> torch.Tensor:
    """The |W|-rule's backward factor T(R / (z + 1e-9)) for z = |x| conv |W| >= 0 (z may be one image).
    The authors divide with ``divide`` (0 where z == 0) after masking z where R == 0; neither mask changes
    a result: the quotient is 0 where R is, and an output with z == 0 has |x_i| |W_oi| = 0 for each of its
    inputs, so its term W_oi * R_o / 1e-9 is 0 or lands on an input with x_i = 0 (which the caller
    multiplies by x_i) or, for an input of ones, has W_oi = 0."""
    return op.transpose(relevance / (z + 1e-9), weight_abs, shape)


def _ones_response(op: AffineOp, weight_abs: torch.Tensor, shape) -> torch.Tensor:
    """1 conv |W| for an input of ones, (1, C_out, H', W'): the input channels are summed into the kernel
    first, so this is a one-channel convolution."""
    if op.kind == "conv" and op.groups == 1:
        return op.forward(torch.ones(1, 1, *shape[2:], dtype=weight_abs.dtype, device=weight_abs.device),
                          weight_abs.sum(dim=1, keepdim=True), None)
    return op.forward(torch.ones(1, *shape[1:], dtype=weight_abs.dtype, device=weight_abs.device),
                      weight_abs, None)


def hidden_conv(op: AffineOp, x: torch.Tensor, raw_weight: torch.Tensor, weight: torch.Tensor,
                relevance: torch.Tensor, grad_out: torch.Tensor, grad_in=None) -> torch.Tensor:
    """A hidden convolution, its input x >= 0 (it follows a ReLU). ``weight`` is the BatchNorm-merged
    kernel: with the gradient at the BatchNorm's output it gives the same input gradients as the
    convolution with the gradient at its own output. ``grad_in``: the input gradient when the gradient
    stream already has it (x feeds this layer only)."""
    nonzero = nonzero_mask(relevance)
    # the factorization uses the input gradient of grad_out masked to where relevance is non-zero; the
    # gradient vanishes there anyway after a ReLU (51 of ResNet50's 52 layers), so the masked gradient is
    # then the stream's own input gradient and one transposed convolution is saved
    masked_grad_out = grad_out * nonzero
    grad_is_masked = torch.equal(masked_grad_out, grad_out)
    if grad_in is None or not grad_is_masked:
        masked_grad = op.transpose(masked_grad_out, weight, x.shape)
    if grad_in is None:
        grad_in = masked_grad if grad_is_masked else op.transpose(grad_out, weight, x.shape)
    elif grad_is_masked:
        masked_grad = grad_in
    m = F.relu((x * grad_in).mean(dim=1, keepdim=True))
    m = divide(m, sample_max(m))
    w_abs = raw_weight.abs()
    c = x * _abs_rule(op, op.forward(x, w_abs, None), w_abs, relevance, x.shape)
    f_x, f_dx = factorization(x, masked_grad, c.mean(dim=1, keepdim=True))
    a = _abs_rule(op, _ones_response(op, w_abs, x.shape), w_abs, relevance, x.shape)
    # (F_x + M) / (1 + e^-C), as sigmoid(C) (the authors add 1e-9 to that denominator)
    residual = (F.relu(f_x) + m) * torch.sigmoid(c) + F.relu(f_dx) + a
    c_nonzero = nonzero_mask(c)
    return delta_shift(c, residual * c_nonzero, c_nonzero)


def hidden_linear(op: AffineOp, x: torch.Tensor, raw_weight: torch.Tensor, relevance: torch.Tensor,
                  grad_out: torch.Tensor, unflattened_shape=None) -> torch.Tensor:
    """A hidden linear layer (x >= 0); right after a flattening it also adds M on the 4-D activations."""
    w_abs = raw_weight.abs()
    c = x * _abs_rule(op, op.forward(x, w_abs, None), w_abs, relevance, x.shape)
    if unflattened_shape is None:
        return c
    spatial_x = x.view(unflattened_shape)
    spatial_grad = op.transpose(grad_out, raw_weight, x.shape).view(unflattened_shape)
    m = (spatial_x * spatial_grad).mean(dim=1, keepdim=True).expand(unflattened_shape).reshape(x.shape)
    m = F.relu(m) * nonzero_mask(c)
    return delta_shift(c, divide(m, sample_max(m)))


def run_streams(net: RelevanceNet, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward through the chain with autograd and backpropagate the sharpened target; every step then
    holds the gradient at its output (``output_gradient``) and at its input (``x.grad``, the image's
    own gradient is never computed), for the (B,) resolved ``targets``. Returns the logits."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = net.chain.forward(leaf)
        kept = {}
        for step in walk(net.chain, containers=True):
            if step.x.requires_grad and step.x is not leaf:
                kept[id(step.x)] = step.x
            if isinstance(step, Residual):
                kept[id(step.total)] = step.total
        objective = sharpened_target(logits, targets).gather(1, targets[:, None]).sum()
        torch.autograd.backward(objective, inputs=list(kept.values()))
    net.chain.assign_output_gradients(None)
    return logits.detach()


class ConvRule(Rule):
    """A hidden convolution: :func:`hidden_conv`; the input gradient of the stream is reused unless the
    input also feeds a skip path (then its gradient is not this layer's alone)."""

    def relprop(self, step, relevance):
        own_grad = None if step.shared_input else step.x.grad
        return hidden_conv(step.op, step.x.detach(), step.raw_weight, step.weight, relevance, step.output_gradient,
                           own_grad)


class LinearRule(Rule):
    """A hidden linear layer: :func:`hidden_linear`, with M when it reads flattened activations."""

    def relprop(self, step, relevance):
        return hidden_linear(step.op, step.x.detach(), step.raw_weight, relevance, step.output_gradient,
                             step.spatial_input_shape)


class ReLURule(Rule):
    """R * x / (x + 1e-9) where x > 0, else 0: the proportional rule of a ReLU in closed form."""

    def relprop(self, step, relevance):
        positive = F.relu(step.x.detach())
        return relevance * positive.div_(positive + 1e-9)


class ProportionalRule(Rule):
    """x * d/dx <f(x) * mask, R / (f(x) * mask)>, mask = (R != 0): pooling."""

    def relprop(self, step, relevance):
        x = step.x.detach()
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            z = step.apply(leaf) * nonzero_mask(relevance)
            (grad,) = torch.autograd.grad(z, leaf, divide(relevance, z.detach()))
        return x * grad


class SkipSumRule(SumRule):
    """The sum and the ReLU after it together, then the block input's two shares recombined."""

    def split(self, step, relevance):
        # the authors: at_sum = R * t / (t + 1e-9) through the ReLU (t = relu(total)), share = divide(at_sum,
        # total); share is 0 wherever at_sum is, so it equals at_sum / (t + 1e-9), one division
        positive = F.relu(step.total.detach())
        denominator = positive + 1e-9
        share = (relevance * positive).div_(denominator).div_(denominator)
        return step.identity.detach() * share, step.residual.detach() * share

    def join(self, step, from_skip, from_branch):
        # the block input x >= 0: x * (divide(from_branch, x) + divide(from_skip, x)) in one quotient
        x = step.x.detach()
        return (from_branch + from_skip).mul_(x).div_(x + 1e-9)


COMPOSITE = Composite({Conv: ConvRule(), Linear: LinearRule(), ReLU: ReLURule(), Dropout: Pass(),
                       MaxPool: ProportionalRule(), AvgPool: ProportionalRule(), Residual: SkipSumRule()},
                      input_rule=ImageBox(divide=divide))
