"""CP-LRP: conservative propagation for transformers (Ali et al., "XAI for Transformers: Better Explanations
through Conservative Propagation", ICML 2022), as Gradient x Input under a modified backward.

The model runs under :class:`methods.transformer.capture.AttentionMode` with ``relevance_rules``: values
unchanged (up to float rounding), but the attention probabilities, LayerNorm's standard deviation and the
GELU/SiLU gates are constants of the backward (:mod:`methods.transformer.rules`). Every remaining operation
of a ViT (linear layers, the patch-embedding convolution, residual sums, LayerNorm's centring and affine
weight, ``A @ v``, token concatenation, the head) is linear in the residual stream, so

    R_x = x * dS/dx   (S = y_t, the target logit; modified gradient)

is LRP-0 through the whole network, and relevance is conserved: sum R_x + sum over the additive constants c
(biases, class/distillation/register tokens, position embedding) of c * dS/dc = y_t. With the biases at zero
only the tokens and the position embedding take a share besides the image. The map is R_x summed over the
colour channels, (B, 1, H, W), signed.

Choices: the CP-LRP rules for attention (probabilities constant: relevance flows through the values only)
and LayerNorm (standard deviation constant) as Ali et al.; GELU/SiLU by the identity rule (their gate
constant; Ali et al. do not treat activations; this is AttnLRP's rule for elementwise activations, and it is
what makes the network conservative). No epsilon stabiliser: Gradient x Input never divides. AttnLRP
(Achtibat et al. 2024) differs in its attention rules (relevance also through the softmax into q and k,
and the bilinear products split evenly), so this is named CP-LRP. Other norms or activations (RMSNorm,
QuickGELU, SwiGLU) keep their plain gradient, which breaks the conservation by their share.
"""
from __future__ import annotations

import torch

from methods.base import Explanation
from methods.hooks import restored_state
from methods.targets import target_gradients
from methods.transformer.vit import TransformerExplainer


class CPLRP(TransformerExplainer):
    """Input relevance of the target logit under the CP-LRP rules (see the module docstring)."""

    name = "cplrp"
    signed = True
    mixed_precision = False  # relevance propagation in float32, as the LRP family
    needs_class_token = False  # the relevance reaches the pixels whatever token the head reads

    def relevance(self, x: torch.Tensor, targets: torch.Tensor, *constants: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits, input relevance x * dS/dx (B, 3, H, W), [c * dS/dc for each of ``constants``]): the
        modified-gradient relevance at the input and at leaf tensors of the model such as the position
        embedding or the class token (a tensor shared by the batch gets the sum of the images' shares)."""
        inputs = x.detach().requires_grad_(True)
        with restored_state(self.model), torch.enable_grad(), self.capture(relevance_rules=True) as mode:
            for constant in constants:
                constant.requires_grad_(True)  # a frozen one too; restored_state puts the flags back
            logits = self.model(inputs)
            self.layout.check_captured(mode.attentions)
            grads = target_gradients(logits, targets, (inputs, *constants), allow_unused=True)
        shares = [c.detach() * g if g is not None else torch.zeros_like(c) for c, g in zip(constants, grads[1:],
                                                                                          strict=True)]
        return logits.detach(), inputs.detach() * grads[0], shares

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        logits, relevance, _ = self.relevance(x, targets)
        return Explanation(relevance.sum(dim=1, keepdim=True), logits)
