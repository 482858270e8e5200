"""NormGrad (Rebuffi, Fong, Ji and Vedaldi, "There and back again: revisiting backpropagation saliency
methods", CVPR 2020).

The weight gradient of a convolution is a sum over its output positions u of outer products g_u p_u^T:
g_u = dS_k/dz_u, the gradient of the target logit S_k at the output z, and p_u the input patch that z_u reads
(its im2col column). NormGrad maps each position to the Frobenius norm of its term,
M_u = ||g_u p_u^T||_F = ||g_u||_2 ||p_u||_2. Variants (``normgrad_variant``), as in the authors' TorchRay fork:

- ``identity`` (default; the fork's ``norm_grad``, the one its pointing-game benchmark runs, at the Grad-CAM
  layer): a virtual 1x1 identity convolution inserted after the layer, so p_u = a_u, the layer's output A at
  u, and g_u = dS_k/da_u: M_u = ||g_u||_2 ||a_u||_2 over channels.
- ``selective`` (the fork's ``norm_grad_selective``): M_u = ||max(a_u * g_u, 0)||_2, elementwise product.
- ``conv`` (the fork's ``norm_grad_proper``): the layer's own aggregation; the layer must be a Conv2d, p_u its
  k x k input patch at u (stride, padding, dilation as the convolution's) and g_u the gradient at its output.
  A grouped convolution's term is block-diagonal: M_u = sqrt(sum_groups ||g_u^grp||^2 ||p_u^grp||^2).

Maps are (B, 1, h, w) at the layer's resolution, non-negative; one forward and one backward from the layer.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from common.precision import full_precision
from methods.base import Explainer, Explanation
from methods.errors import MethodError
from methods.hooks import LayerCapture, Post
from methods.options import Option, choice
from methods.targets import target_gradients
from models.spec import ModelSpec
from models.tokens import TokenLayout

VARIANTS = ("identity", "selective", "conv")

VARIANT = Option("normgrad_variant", "--normgrad-variant", "identity", partial(choice, choices=VARIANTS),
                 "NormGrad's map at each position u of the layer: identity ||g_u|| ||a_u|| (a virtual 1x1 "
                 "identity after the layer; the TorchRay fork's benchmark), selective ||max(a_u g_u, 0)||, or "
                 "conv ||g_u|| ||p_u|| with p_u the k x k input patch of a Conv2d target layer (--target-layer)")
NORMGRAD_OPTIONS = (VARIANT,)


def channel_norm(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 1, h, w): the L2 norm over channels at each position."""
    return torch.linalg.vector_norm(tensor, dim=1, keepdim=True)


def patch_energy(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """(B, G, h, w): ||p_u^grp||^2, the squared norm of each group's input patch read by each output position u
    of ``conv`` (G = its groups). The convolution's own forward runs on the squared input with a ones kernel of
    one output channel per group, so its padding (any padding mode; the TensorFlow "same" padding of the
    embedded EfficientNet-Lite, computed in its forward), stride and dilation apply as they do to the input
    (the padding of a square is the square of the padding). No im2col tensor is made; no hook fires."""
    squares = inputs.float().pow(2)
    probe = copy.copy(conv)  # the same module without its hooks, reading a ones weight and a zero bias
    probe._forward_hooks, probe._forward_pre_hooks = OrderedDict(), OrderedDict()
    ones = torch.ones(conv.groups, conv.in_channels // conv.groups, *conv.weight.shape[2:], dtype=squares.dtype,
                      device=squares.device)
    bias = None if conv.bias is None else torch.zeros(conv.groups, dtype=squares.dtype, device=squares.device)
    probe._parameters = {"weight": ones, "bias": bias}
    return probe.forward(squares)


def group_energy(grads: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C_out, h, w) -> (B, G, h, w): ||g_u^grp||^2 of each group's output channels."""
    return grads.float().pow(2).unflatten(1, (groups, -1)).sum(dim=2)


class NormGrad(Explainer):
    """NormGrad at ``layer``: one forward and one backward of the target logit S_k from the layer on (the
    layers before build no graph), then the variant's per-position norm (see the module's docstring)."""

    name = "normgrad"

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post | None = None,
                 normgrad_variant: str = VARIANT.default):
        super().__init__(model)
        self.variant = VARIANT.validate(normgrad_variant)
        if self.variant == "conv":
            check_conv_layer(layer, activation_post)
        self.layer = layer
        self.activation_post = activation_post

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        if self.variant == "conv":
            return self.explain_conv(x, targets)
        with torch.enable_grad(), LayerCapture(self.layer, self.activation_post) as capture:
            logits = capture.forward(self.model, x)
            (grads,) = target_gradients(logits, targets, capture.activation)
        self.check_gradients(grads, self.layer)
        with full_precision(x.device.type):
            activations, grads = capture.activation.detach().float(), grads.float()
            if self.variant == "identity":
                maps = channel_norm(grads) * channel_norm(activations)
            else:
                maps = channel_norm((activations * grads).clamp(min=0))
        return Explanation(maps, logits.detach())

    def explain_conv(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """The ``conv`` variant: ||p_u||^2 from the layer's input, taken in a pre-hook during the forward (the
        input is read at once, before a later in-place op can change it), and ||g_u||^2 at its output."""
        energies: list[torch.Tensor] = []

        def record_patches(module: nn.Module, inputs: tuple) -> None:
            with full_precision(inputs[0].device.type):
                energies.append(patch_energy(module, inputs[0]))

        handle = self.layer.register_forward_pre_hook(record_patches)
        try:
            with torch.enable_grad(), LayerCapture(self.layer) as capture:
                logits = capture.forward(self.model, x)
                (grads,) = target_gradients(logits, targets, capture.activation)
        finally:
            handle.remove()
        self.check_gradients(grads, self.layer)
        with full_precision(x.device.type):
            maps = (group_energy(grads, self.layer.groups) * energies[-1]).sum(dim=1, keepdim=True).sqrt()
        return Explanation(maps, logits.detach())

    def __repr__(self) -> str:
        return f"NormGrad(normgrad_variant={self.variant!r})"


def check_conv_layer(layer: nn.Module, activation_post: Post | None) -> None:
    """MethodError unless ``layer`` is a 2-D convolution (its forward: a padding, then ``F.conv2d`` with its own
    weight, as Conv2d and its "same"-padding subclasses; a forward that transforms the weight, weight
    standardisation, does not read patches this way)."""
    if not isinstance(layer, nn.Conv2d) or isinstance(activation_post, TokenLayout):
        raise MethodError(f"normgrad_variant 'conv' needs a Conv2d target layer (its own k x k aggregation), got "
                          f"{type(layer).__name__}: choose one with --target-layer (VGG16: features.28)")
    if "StdConv" in type(layer).__name__:  # timm's StdConv2d / ScaledStdConv2d standardise their weight
        raise MethodError(f"normgrad_variant 'conv' cannot read the patches of {type(layer).__name__} (a "
                          "weight-standardising convolution): use the identity variant")
    if activation_post is not None:
        raise MethodError("normgrad_variant 'conv' takes the convolution's own output; this target layer has an "
                          "activation_post: choose the convolution with --target-layer")


def build_normgrad(spec: ModelSpec, **options) -> NormGrad:
    """NormGrad at the spec's CAM layer (``--target-layer`` chooses another)."""
    return NormGrad(spec.model, spec.layer, spec.activation_post, **options)
