"""CP-LRP forward functions: the values of LayerNorm, GELU and SiLU with some factors detached, so that the
gradient of the modified graph times the input is a conservative relevance propagation (Ali et al., "XAI for
Transformers: Better Explanations through Conservative Propagation", ICML 2022).

Gradient x Input equals LRP-0 through every layer that is linear and bias-free in its input given its
detached factors: then ``sum_i x_i dS/dx_i = S`` layer by layer. Three parts of a ViT block are not linear:

* attention ``P @ v`` with ``P = softmax(q k^T)``: P is a constant (the CP-LRP "AH rule"; done by
  :class:`methods.transformer.capture.AttentionMode`), so relevance flows through v only, none through q, k;
* LayerNorm ``(x - mean) / sqrt(var + eps) * w + b``: the denominator is a constant (CP-LRP's "LN rule");
  centring is linear and keeps its gradient;
* GELU ``x * Phi(x)`` (tanh form: ``x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2``) and SiLU
  ``x * sigmoid(x)``: the gate is a constant, so the relevance passes unchanged (the identity rule, as
  AttnLRP, Achtibat et al. ICML 2024, handles elementwise activations). Ali et al. discuss only attention
  and LayerNorm; with GELU's plain gradient ``Phi(x) + x phi(x)`` relevance is not conserved. As the gate
  is ``gelu(x) / x`` without the division, no epsilon stabiliser is needed.

Biases, the class/register tokens and the position embedding are constants added to the stream: they take
their share of relevance (``b * dS/db``), which the input map does not contain.

Values equal the library functions up to float rounding. Each function takes the arguments of the one it
stands in for (``IDENTITY_RULES`` maps the library function to its stand-in).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm with the standard deviation a constant of the backward (biased variance, as LayerNorm)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    centred = input - input.mean(dim=dims, keepdim=True)
    std = (centred.pow(2).mean(dim=dims, keepdim=True) + eps).sqrt()
    out = centred / std.detach()
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def gelu_gate(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x) / x without dividing: Phi(x), or the tanh approximation's gate."""
    if approximate == "tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * input.pow(3))))
    if approximate != "none":
        raise ValueError(f"approximate argument must be either none or tanh, got {approximate!r}")
    return 0.5 * (1.0 + torch.erf(input * (1.0 / math.sqrt(2.0))))


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """F.gelu as ``x * gate(x)`` with the gate a constant of the backward (identity rule)."""
    return input * gelu_gate(input, approximate).detach()


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """F.silu as ``x * sigmoid(x)`` with the sigmoid a constant of the backward (identity rule); never in place."""
    return input * torch.sigmoid(input).detach()


IDENTITY_RULES = {F.layer_norm: layer_norm, F.gelu: gelu, F.silu: silu}
