"""Chefer, Gur & Wolf's gradient-weighted attention relevance for ViTs.

Both methods accumulate per-block token-mixing matrices Abar^(b) (B, N, N) from the blocks' attention
probabilities A^(b) (B, heads, N, N) and the plain gradient of the target logit ``S = y_t`` with respect to
them, ``grad A^(b) = dS/dA^(b)`` (through everything after block b, queries and keys included):

    R = I;   for b = 1..L:   R = R + Abar^(b) R          (R = (I + Abar^(L)) ... (I + Abar^(1)))

and the map is the class token's row of R over the patch tokens, ``R[0, prefix:]``, on the patch grid. The
identity only adds to the prefix columns of that row, so nothing is subtracted. Maps are non-negative.

``gradrollout`` -- "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (ICCV 2021), self-attention rule:

    Abar^(b) = E_h[(grad A^(b) * A^(b))^+]        (elementwise product, positive part, mean over heads)

``transformer_attribution`` (alias ``chefer``) -- "Transformer Interpretability Beyond Attention
Visualization" (CVPR 2021):

    Abar^(b) = E_h[(grad A^(b) * R_A^(b))^+],     R_A^(b) = 0.5 * A^(b) * dS/dA^(b) under the CP-LRP backward

R_A^(b) is the LRP relevance of the attention weights of block b: Gradient x Input at A^(b) in the modified
graph of :mod:`methods.transformer.rules` (LayerNorm's standard deviation, GELU's gate and the attention
weights of the blocks above b held constant; linear layers, residual sums and ``A @ v`` differentiated as
they are, i.e. LRP-0), halved as the authors split the relevance of ``A @ v`` equally between A and v. The
R = R + Abar R accumulation is the authors' code's (I + Abar^(b) multiplied with the later block on the left,
rows not renormalised), the order in which token mixing composes; the paper's Eq. 13 lists the factors
first block first.

Where this differs from the authors' code, which rewrites every layer into an LRP module:

* their linear layers use the alpha=1, beta=0 (z+) rule, their LayerNorm/GELU/softmax propagate with their
  own rules and the relevance of the attention weights continues into q and k; here every linear layer is
  LRP-0 (Gradient x Input), LayerNorm/GELU follow the CP-LRP/identity rules and nothing flows through the
  softmax (CP-LRP's attention rule), so R_A^(b) only collects relevance arriving through the residual stream
  and the value paths of the later blocks;
* their output relevance is the one-hot vector (1 at the target); here it is the target logit y_t itself
  (``R = one_hot * logits``, as this toolkit's LRP), so R_A^(b) is the authors' one-hot relevance scaled by
  y_t under LRP-0 -- with a positive logit the same terms up to that factor, with a negative logit (an
  unlikely class) the positive and negative parts swap;
* their ViT code explains one image (``cam[0]``); here every image of the batch is explained at once.

``transformer_attribution`` runs two forward/backward passes (plain gradients, then the modified ones);
``gradrollout`` one.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from methods.base import Explanation, widen_half
from methods.targets import target_gradients
from methods.transformer.vit import TransformerExplainer


def positive_head_mean(grads: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """E_h[(grads * values)^+]: (B, heads, N, N) twice -> (B, N, N)."""
    return (grads * values).clamp(min=0).mean(dim=1)


def accumulate(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """R = I, then R = R + M R for each block's (B, N, N) matrix M, first block first."""
    first = matrices[0]
    relevance = torch.eye(first.shape[-1], dtype=first.dtype, device=first.device).expand_as(first)
    for matrix in matrices:
        relevance = relevance + matrix @ relevance
    return relevance


class GradientWeightedAttention(TransformerExplainer):
    """Maps from R = R + Abar^(b) R (see the module docstring); subclasses give Abar's factors."""

    @abstractmethod
    def terms(self, x: torch.Tensor, targets: torch.Tensor
              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(logits, grad A^(b) per block, the values they weight per block)."""

    def attention_gradients(self, x: torch.Tensor, targets: torch.Tensor, relevance_rules: bool = False
                            ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """One forward/backward: (logits, A^(b), dS/dA^(b)), the gradient plain or, with
        ``relevance_rules``, under the CP-LRP backward."""
        with torch.enable_grad(), self.capture(relevance_rules, True) as mode:
            logits = self.model(x)
            self.layout.check_captured(mode.attentions)
            grads = target_gradients(logits, targets, mode.attentions)
        attentions = [widen_half(a.detach()) for a in mode.attentions]
        return logits.detach(), attentions, [widen_half(g) for g in grads]

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        logits, grads, values = self.terms(x, targets)
        relevance = accumulate([positive_head_mean(g, v) for g, v in zip(grads, values, strict=True)])
        return Explanation(self.layout.patch_map(relevance[:, 0], *x.shape[-2:]), logits)


class GradRollout(GradientWeightedAttention):
    """Generic attention explainability (ICCV 2021): Abar^(b) = E_h[(grad A^(b) * A^(b))^+]."""

    name = "gradrollout"
    mixed_precision = True  # as Grad-CAM: one forward/backward, combined in float32

    def terms(self, x, targets):
        logits, attentions, grads = self.attention_gradients(x, targets)
        return logits, grads, attentions


class TransformerAttribution(GradientWeightedAttention):
    """Transformer attribution (CVPR 2021): Abar^(b) = E_h[(grad A^(b) * R_A^(b))^+], R_A^(b) the CP-LRP
    relevance of the attention weights (see the module docstring)."""

    name = "transformer_attribution"
    official_raw = True  # in the official code's list of raw methods
    mixed_precision = False  # relevance propagation, in float32 as the LRP family

    def terms(self, x, targets):
        logits, _, grads = self.attention_gradients(x, targets)
        _, attentions, lrp_grads = self.attention_gradients(x, targets, relevance_rules=True)
        relevance = [0.5 * a * g for a, g in zip(attentions, lrp_grads, strict=True)]
        return logits, grads, relevance
