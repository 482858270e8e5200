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
the image's own minimum and maximum. The final map is divided by its maximum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.relevance.rules import AffineOp


def divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AGF's safe division, a / (b + 1e-9) and 0 where b == 0. (The authors write the denominator as
    b.clamp(min=1e-9) + b.clamp(max=1e-9), which is b + 1e-9 for every b.)"""
    return torch.where(b != 0, a / (b + 1e-9), 0.0)


def sample_max(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).max(dim=1).values.view(-1, *([1] * (t.dim() - 1)))


def delta_shift(base: torch.Tensor, extra: torch.Tensor, nonzero=None) -> torch.Tensor:
    """base + extra - mean(extra) over base's non-zero entries: the total of ``base`` is kept."""
    nonzero = base != 0 if nonzero is None else nonzero
    dims = list(range(1, extra.dim()))
    mean = extra.sum(dim=dims, keepdim=True) / nonzero.sum(dim=dims, keepdim=True)
    return base + extra - torch.where(nonzero, mean, 0.0)


def sharpened_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """y' = softmax(y_t * exp(-0.5 ((y - y_t) / s)^2)), s = max |y - y_t| (the start of both streams)."""
    target_logit = logits.gather(1, targets[:, None])
    spread = (logits - target_logit).abs().max(dim=1, keepdim=True).values
    return torch.softmax(target_logit * torch.exp(-0.5 * ((logits - target_logit) / spread) ** 2), dim=1)


def _cluster_weights(hard: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """W1 - W0 of the ridge regression (R^T R + I)^-1 R^T H, R = per-channel representatives of the
    positive and negative regions of phi, H = the hard map; ReLU'd as the authors do."""
    batch, channels = hard.shape[:2]
    positive_region = (phi > 0).to(hard.dtype)[:, 0]
    negative_region = (phi < 0).to(hard.dtype)[:, 0]
    rep_pos = divide(torch.einsum("bchw,bhw->bc", hard, positive_region), positive_region.sum(dim=(1, 2))[:, None])
    rep_neg = divide(torch.einsum("bchw,bhw->bc", hard, negative_region), negative_region.sum(dim=(1, 2))[:, None])
    reps = torch.stack([rep_neg, rep_pos], dim=-1)                         # (B, C, 2)
    gram = reps.transpose(1, 2) @ reps + torch.eye(2, dtype=hard.dtype, device=hard.device)
    weights = torch.linalg.solve(gram, reps.transpose(1, 2) @ hard.reshape(batch, channels, -1))
    weights = F.relu(weights.reshape(batch, 2, *hard.shape[2:]))
    return weights[:, 1:2] - weights[:, 0:1]


def _hardness(t: torch.Tensor) -> torch.Tensor:
    """10 / max(t) per image (0 where the max is 0): sigmoid(10 * t / max) in one multiply."""
    peak = sample_max(t)
    return torch.where(peak != 0, 10 / (peak + 1e-9), 0.0)


def factorization(x: torch.Tensor, grad: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_x, F_dx), (B, 1, H, W): foreground-minus-background weights of the activations and gradients."""
    grad_hard = torch.sigmoid(grad * _hardness(grad))
    x_hard = torch.sigmoid(x * _hardness(x))
    return _cluster_weights(x_hard, phi), _cluster_weights(grad_hard, phi)


def _abs_rule(op: AffineOp, x_abs: torch.Tensor, weight_abs: torch.Tensor, relevance: torch.Tensor,
              nonzero: torch.Tensor, shape) -> torch.Tensor:
    """d/dx of <(|x| conv |W|) masked, R / that>: the |W|-rule's backward factor (x_abs may be one image).
    The authors mask z where R == 0; the quotient is 0 there anyway, so no mask is needed."""
    return op.transpose(divide(relevance, op.forward(x_abs, weight_abs, None)), weight_abs, shape)


def hidden_conv(op: AffineOp, x: torch.Tensor, raw_weight: torch.Tensor, weight: torch.Tensor,
                relevance: torch.Tensor, grad_out: torch.Tensor, grad_in=None) -> torch.Tensor:
    """A hidden convolution, its input x >= 0 (it follows a ReLU). ``weight`` is the BatchNorm-merged
    kernel: with the gradient at the BatchNorm's output it gives the same input gradients as the
    convolution with the gradient at its own output. ``grad_in``: the input gradient when the gradient
    stream already has it (x feeds this layer only)."""
    nonzero = relevance != 0
    if grad_in is None:
        grad_in = op.transpose(grad_out, weight, x.shape)
    m = F.relu((x * grad_in).mean(dim=1, keepdim=True))
    m = divide(m, sample_max(m))
    w_abs = raw_weight.abs()
    c = x * _abs_rule(op, x, w_abs, relevance, nonzero, x.shape)
    masked_grad = op.transpose(torch.where(nonzero, grad_out, 0.0), weight, x.shape)
    f_x, f_dx = factorization(x, masked_grad, c.mean(dim=1, keepdim=True))
    a = _abs_rule(op, torch.ones_like(x[:1]), w_abs, relevance, nonzero, x.shape)
    # (F_x + M) / (1 + e^-C), as sigmoid(C) (the authors add 1e-9 to that denominator)
    residual = (F.relu(f_x) + m) * torch.sigmoid(c) + F.relu(f_dx) + a
    c_nonzero = c != 0
    return delta_shift(c, torch.where(c_nonzero, residual, 0.0), c_nonzero)


def hidden_linear(op: AffineOp, x: torch.Tensor, raw_weight: torch.Tensor, relevance: torch.Tensor,
                  grad_out: torch.Tensor, unflattened_shape=None) -> torch.Tensor:
    """A hidden linear layer (x >= 0); right after a flattening it also adds M on the 4-D activations."""
    c = x * _abs_rule(op, x, raw_weight.abs(), relevance, relevance != 0, x.shape)
    if unflattened_shape is None:
        return c
    spatial_x = x.view(unflattened_shape)
    spatial_grad = op.transpose(grad_out, raw_weight, x.shape).view(unflattened_shape)
    m = (spatial_x * spatial_grad).mean(dim=1, keepdim=True).expand(unflattened_shape).reshape(x.shape)
    m = torch.where(c != 0, F.relu(m), 0.0)
    return delta_shift(c, divide(m, sample_max(m)))


def proportional(forward, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """x * d/dx <forward(x) * mask, relevance / (forward(x) * mask)>: parameter-free layers."""
    if forward is F.relu:  # closed form: x * relevance / (relu(x) + 1e-9) where x > 0
        return x * torch.where(x > 0, divide(relevance, torch.where(relevance != 0, x.clamp(min=0), 0.0)), 0.0)
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        z = torch.where(relevance != 0, forward(leaf), 0.0)
        (grad,) = torch.autograd.grad(z, leaf, divide(relevance, z.detach()))
    return x * grad


def run_streams(net, x: torch.Tensor, targets_fn):
    """Forward through the chain with autograd and backpropagate the sharpened target, keeping the gradient
    at every step's input (and at every residual sum). Returns (logits, targets)."""
    from methods.relevance.network import Residual, walk
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = net.chain.forward(leaf)
        for step in walk(net.chain, containers=True):
            if getattr(step, "x", None) is not None and step.x.requires_grad and step.x is not leaf:
                step.x.retain_grad()
            if isinstance(step, Residual):
                step.total.retain_grad()
        targets = targets_fn(logits.detach())
        sharpened_target(logits, targets).gather(1, targets[:, None]).sum().backward()
    return logits.detach(), targets


def propagate(step, relevance: torch.Tensor, grad_out, previous=None) -> torch.Tensor:
    """The relevance stream through one step (recursing into chains and residual blocks)."""
    from methods.relevance import rap
    from methods.relevance.network import Affine, AvgPool, Chain, Flatten, MaxPool, Pass, Residual
    if isinstance(step, Chain):
        for index in range(len(step.steps) - 1, -1, -1):
            later = step.steps[index + 1].x.grad if index + 1 < len(step.steps) else grad_out
            before = step.steps[index - 1] if index > 0 else None
            relevance = propagate(step.steps[index], relevance, later, before)
        return relevance
    if isinstance(step, Affine) and not step.first and step.op.kind == "conv":
        # the gradient stream's input gradient is this layer's alone unless x also feeds a skip path
        own_grad = step.x.grad if previous is not None else None
        return hidden_conv(step.op, step.x.detach(), step.raw_weight, step.weight, relevance, grad_out, own_grad)
    if isinstance(step, Affine):
        if step.first:
            return rap.input_propagation(step.op, step.x.detach(), step.raw_weight, relevance, divide=divide)
        x = step.x.detach()
        if step.op.kind == "conv":
            return hidden_conv(step.op, x, step.raw_weight, step.weight, relevance, grad_out)
        shape = previous.x.shape if isinstance(previous, Flatten) else None
        return hidden_linear(step.op, x, step.raw_weight, relevance, grad_out, shape)
    if isinstance(step, Pass):
        return proportional(F.relu, step.x.detach(), relevance) if step.fn is not None else relevance
    if isinstance(step, (MaxPool, AvgPool)):
        return proportional(step.pool, step.x.detach(), relevance)
    if isinstance(step, Flatten):
        return relevance.view(step.x.shape)
    if isinstance(step, Residual):
        total = step.total.detach()
        at_sum = proportional(F.relu, total, relevance)
        share = divide(at_sum, total * (at_sum != 0).to(total.dtype))
        identity, residual = step.identity.detach(), step.residual.detach()
        from_branch = propagate(step.branch, residual * share, step.total.grad)
        from_skip = propagate(step.skip, identity * share, step.total.grad) if step.skip else identity * share
        x = step.x.detach()
        return x * (divide(from_branch, x) + divide(from_skip, x))
    raise TypeError(f"AGF cannot propagate through {type(step).__name__}")
