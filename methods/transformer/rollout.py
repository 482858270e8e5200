"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Per block b the heads' attention probabilities A^(b) (B, heads, N, N), rows = queries, are fused over the
heads (mean by default; max or min), optionally the lowest ``discard_ratio`` of the fused entries of each
image are set to zero, the residual connection is added as half the identity and the rows are renormalised:

    Abar^(b) = (0.5 * fuse(A^(b)) + 0.5 * I) / row sums          (rows sum to 1)

and the rollout is the product with the first block applied first, i.e. on the right:

    Atilde = Abar^(L) ... Abar^(2) Abar^(1)

(the paper's recursion Atilde(l_i) = A(l_i) Atilde(l_{i-1}): token i of the last block mixes tokens of block
L-1 by row i of Abar^(L), and so on down to the input tokens). The map is the class token's row of Atilde
over the patch tokens, on the patch grid. It does not depend on the target class (the target is checked and
otherwise unused). Rows of Atilde sum to 1; the map sums to 1 minus the share left on the prefix tokens.

Discarding follows the common public implementation (J. Gildenblat's vit-explain): the lowest
``floor(discard_ratio * N * N)`` fused entries per image become 0 before the identity is added; unlike it no
entry (it spares the class token's self-attention) is exempt.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from methods.base import Explanation, widen_half
from methods.hooks import restored_state
from methods.options import Option, choice, in_interval
from methods.transformer.vit import TransformerExplainer

HEAD_FUSIONS = ("mean", "max", "min")
HEAD_FUSION = Option("head_fusion", "--head-fusion", "mean", partial(choice, choices=HEAD_FUSIONS),
                     f"how a block's attention heads are fused: {', '.join(HEAD_FUSIONS)}")
DISCARD_RATIO = Option("discard_ratio", "--discard-ratio", 0.0, partial(in_interval, low=0.0, high=1.0, open_high=True),
                       "share of the lowest fused attention weights set to 0 per block, in [0, 1)", type=float)
ROLLOUT_OPTIONS = (HEAD_FUSION, DISCARD_RATIO)


def fuse_heads(attention: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N): mean, max or min over the heads."""
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    if fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {fusion!r}")


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, N, N) with the lowest ``floor(ratio * N * N)`` entries of each image set to 0."""
    flat = fused.flatten(1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    lowest = flat.topk(count, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).view_as(fused)


def with_residual(fused: torch.Tensor) -> torch.Tensor:
    """0.5 * fused + 0.5 * I with its rows renormalised to sum 1 (= (fused + I) / row sums)."""
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    mixed = fused + eye
    return mixed / mixed.sum(dim=-1, keepdim=True)


def rollout(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Product of per-block (B, N, N) matrices, the first block's on the right: M_L ... M_2 M_1."""
    result = matrices[0]
    for matrix in matrices[1:]:
        result = matrix @ result
    return result


def rollout_matrix(attentions: Sequence[torch.Tensor], head_fusion: str = "mean",
                   discard_ratio: float = 0.0) -> torch.Tensor:
    """Atilde (B, N, N) from the blocks' (B, heads, N, N) attention probabilities (see the module docstring)."""
    return rollout([with_residual(discard_lowest(fuse_heads(a, head_fusion), discard_ratio)) for a in attentions])


class Rollout(TransformerExplainer):
    """Attention rollout (see the module docstring); maps (B, 1, h, w) on the patch grid, non-negative."""

    name = "rollout"
    official_raw = True  # in the official code's list of raw methods
    mixed_precision = True  # a forward only; the probabilities are rolled out in float32

    def __init__(self, model: nn.Module, model_name: str | None = None, head_fusion: str = HEAD_FUSION.default,
                 discard_ratio: float = DISCARD_RATIO.default):
        self.head_fusion = HEAD_FUSION.validate(head_fusion)
        self.discard_ratio = DISCARD_RATIO.validate(discard_ratio)
        super().__init__(model, model_name)

    def matrix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rollout Atilde (B, N, N), logits) for ``x`` (the model's state restored: also called directly)."""
        with restored_state(self.model), torch.no_grad(), self.capture() as mode:
            logits = self.model(x)
        self.layout.check_captured(mode.attentions)
        attentions = [widen_half(a) for a in mode.attentions]
        return rollout_matrix(attentions, self.head_fusion, self.discard_ratio), logits

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        matrix, logits = self.matrix(x)  # class-agnostic; bad targets are still refused (by the template)
        return Explanation(self.layout.patch_map(matrix[:, 0], *x.shape[-2:]), logits)

    def __repr__(self) -> str:
        return f"Rollout(head_fusion={self.head_fusion!r}, discard_ratio={self.discard_ratio:g})"
