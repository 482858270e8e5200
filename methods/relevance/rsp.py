"""Relative Sectional Propagation (Nam et al., AAAI 2021), following the authors' public implementation.

RSP starts at the CAM layer (the last convolutional block) from the channel-wise Grad-CAM terms
w_c A_c scaled by their maximum, and propagates them to the input. At a hidden convolution the positive
and the negative relevance each build their own "section" kernel, the weight gradient of that relevance
(G+ = dL+/dW with L+ = sum R+ * (x conv W)), and are redistributed through x conv G+ and x conv G-:
R_in = 2 (C+ - C-) shifted uniformly to keep the layer's total (3x3 kernels), or C+ - C- (1x1 kernels,
which are conservative as they are). The input layer uses z^B with the image's own minimum and maximum,
BatchNorm passes relevance through, and a residual sum splits relevance in proportion to its clamped
summands. The authors' code sums the section kernels over the images of a batch; here each image gets
its own (grouped convolutions), so a batch gives the same maps as one image at a time.
:data:`COMPOSITE` maps the chain's steps (below the last convolutional block) to these rules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.relevance.network import Composite, Conv, MaxPool, RelevanceNet, ReLU, Residual
from methods.relevance.rap import ExactSkipSum, ImageBox, shift_to_total
from methods.relevance.rules import AffineOp, Pass, Rule, WinnerTakesAll, safe_reciprocal
from methods.targets import target_gradients


def _grouped(op: AffineOp, batch: int) -> dict:
    return dict(stride=op.stride, padding=op.padding, dilation=op.dilation, groups=batch * op.groups)


def per_sample_weight_gradient(op: AffineOp, x: torch.Tensor, grad_output: torch.Tensor,
                               weight_shape: torch.Size) -> torch.Tensor:
    """(B * C_out, C_in, k, k): for each image, the gradient of sum(grad_output * conv(x, W)) w.r.t. W."""
    batch = x.shape[0]
    stacked = x.reshape(1, -1, *x.shape[2:])
    out = grad_output.reshape(1, -1, *grad_output.shape[2:])
    size = (batch * weight_shape[0], *weight_shape[1:])
    return torch.nn.grad.conv2d_weight(stacked, size, out, **_grouped(op, batch))


def _conv_each(op: AffineOp, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernels, None, **_grouped(op, batch))
    return out.reshape(batch, -1, *out.shape[2:])


def _conv_each_transpose(op: AffineOp, s: torch.Tensor, kernels: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    batch = shape[0]
    stacked_shape = (1, batch * shape[1], *shape[2:])
    grad = torch.nn.grad.conv2d_input(stacked_shape, kernels, s.reshape(1, -1, *s.shape[2:]), **_grouped(op, batch))
    return grad.reshape(shape)


def _pointwise_propagation(op: AffineOp, x: torch.Tensor, positive: torch.Tensor,
                           negative: torch.Tensor) -> torch.Tensor:
    """The 1x1 case with batched matrix products. With X the (C_in, L) input pixels the convolution reads
    and R± the (C_out, L) relevance: section kernels K = R X^T, z = K X, R_in = x * (K+^T q+ - K-^T q-)
    with q = R / z (0 where z = 0). By associativity z = R (X^T X) and K^T q = X (R^T q): where the
    L x L Gram matrix is cheaper than the C_out x C_in kernels (ResNet's last stages, L = 196 or 49) it
    is used instead."""
    sampled = x[:, :, ::op.stride[0], ::op.stride[1]]
    inputs = sampled.flatten(2)                                     # X: (B, C_in, L)
    parts = positive.flatten(2), negative.flatten(2)                # R±: (B, C_out, L)
    c_in, pixels, c_out = inputs.shape[1], inputs.shape[2], parts[0].shape[1]
    if (2 * c_in + 4 * c_out) * pixels < 6 * c_out * c_in:
        gram = inputs.transpose(1, 2) @ inputs                      # (B, L, L)
        mixed = [rel.transpose(1, 2) @ (rel * safe_reciprocal(rel @ gram)) for rel in parts]
        back = inputs @ (mixed[0] - mixed[1])
    else:
        kernels = [rel @ inputs.transpose(1, 2) for rel in parts]   # (B, C_out, C_in)
        back = [k.transpose(1, 2) @ (rel * safe_reciprocal(k @ inputs)) for k, rel in zip(kernels, parts, strict=True)]
        back = back[0] - back[1]
    spread = torch.zeros_like(x)
    spread[:, :, ::op.stride[0], ::op.stride[1]] = back.view_as(sampled)
    return x * spread


def hidden_propagation(op: AffineOp, x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """A hidden convolution (input x >= 0, bias ignored). The authors mask z by the non-zero relevance of
    its sign; the quotient R / z is 0 there anyway, so no mask is applied."""
    positive, negative = relevance.clamp(min=0), -relevance.clamp(max=0)
    pointwise = weight.shape[-2:] == (1, 1)
    if pointwise and op.padding == (0, 0) and op.dilation == (1, 1) and op.groups == 1:
        return _pointwise_propagation(op, x, positive, negative)
    shape = x.shape
    from_parts = []
    for part in (positive, negative):
        # d/dW of sum(R * mask * conv(x, W)) = the weight gradient of R (the mask is 1 wherever R != 0)
        kernels = per_sample_weight_gradient(op, x, part, weight.shape)
        z = _conv_each(op, x, kernels)
        from_parts.append(_conv_each_transpose(op, part * safe_reciprocal(z), kernels, shape))
    from_pos, from_neg = x * from_parts[0], x * from_parts[1]
    if pointwise:
        return from_pos - from_neg
    total = (positive - negative).flatten(1).sum(1).view(-1, 1, 1, 1)
    return shift_to_total(2 * (from_pos - from_neg), total)


def gradcam_terms(net: RelevanceNet, targets: torch.Tensor) -> torch.Tensor:
    """w_c A_c at the end of the last convolutional block (Grad-CAM without the channel sum), w_c the
    spatial mean of dS_k/dA_c; ``net`` has run its forward."""
    head = net.chain.steps[net.block_end:]
    with torch.enable_grad():
        activation = head[0].x.detach().requires_grad_(True)
        logits = activation
        for step in head:
            logits = step.apply(logits)
        (grads,) = target_gradients(logits, targets, activation)
    return grads.mean(dim=(2, 3), keepdim=True) * activation.detach()


class HiddenRule(Rule):
    """A hidden convolution: :func:`hidden_propagation` with the layer's own kernel."""

    def relprop(self, step, relevance):
        return hidden_propagation(step.op, step.x, step.raw_weight, relevance)


class ClampedSkipSum(ExactSkipSum):
    """The skip sum split in proportion to its summands clamped at 0 (plus 1e-9 each), as the authors do."""

    def summands(self, step):
        return step.identity.clamp(min=0) + 1e-9, step.residual.clamp(min=0) + 1e-9


COMPOSITE = Composite({Conv: HiddenRule(), ReLU: Pass(), MaxPool: WinnerTakesAll(), Residual: ClampedSkipSum()},
                      input_rule=ImageBox())
