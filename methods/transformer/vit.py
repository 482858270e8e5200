"""Which models the transformer explainers take, and where their tokens sit.

A ViT-style model here is a timm ``VisionTransformer`` (or a subclass: DeiT, distilled DeiT, models with
register tokens): ``patch_embed``, a sequence ``blocks`` whose every block has a timm ``Attention`` as
``attn`` (self-attention over all N tokens, one SDPA call per block), ``num_prefix_tokens`` tokens before
the patch tokens (class, distillation and register tokens), and no attention pooling. The class-token
methods also need the head to read the class token (``global_pool == 'token'``): the map is the class
token's row over the patch tokens.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import Explainer
from methods.errors import MethodError
from methods.transformer.capture import attention_capture


@dataclass(frozen=True)
class ViTLayout:
    """attentions: the blocks' timm ``Attention`` modules in order; prefix_tokens: tokens before the patches
    (the class token first)."""

    model: nn.Module
    attentions: tuple[nn.Module, ...]
    prefix_tokens: int

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, columns) for an input of ``height x width`` pixels, from the patch embedding
        (non-square and dynamic sizes included; timm's dynamic padding rounds up)."""
        embed = self.model.patch_embed
        if hasattr(embed, "dynamic_feat_size"):
            rows, cols = embed.dynamic_feat_size((height, width))
        else:
            rows, cols = embed.grid_size
        return int(rows), int(cols)

    def check_captured(self, attentions: Sequence[torch.Tensor]) -> None:
        """RuntimeError unless the forward made one attention call per block."""
        if len(attentions) != len(self.attentions):
            raise RuntimeError(f"expected {len(self.attentions)} attention calls (one per block) in the forward "
                               f"pass, saw {len(attentions)}")

    def patch_map(self, rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N) values over all tokens -> (B, 1, h, w) over the patch grid (prefix tokens dropped)."""
        grid = self.grid(height, width)
        patches = rows[:, self.prefix_tokens:]
        if patches.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"{patches.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} patch grid of "
                               f"a {height}x{width} input")
        return patches.reshape(rows.shape[0], 1, *grid)


def vit_layout(model: nn.Module, model_name: str, class_token: bool = True) -> ViTLayout:
    """The layout of ``model``, or MethodError (one line) when it is not a ViT-style transformer (with its
    head on the class token when ``class_token``). The message has no subject: the registry puts the
    method's name before it ("rollout: needs a ViT-style transformer ...; resnet50 has none")."""
    need = "a ViT-style transformer with a class token" if class_token else "a ViT-style transformer"
    refuse = f"needs {need} (timm VisionTransformer/DeiT); {model_name}"
    # a timm model has imported timm's attention module; a model without it has no timm Attention, and
    # checking it costs no import of timm (seconds) for the CNNs
    timm_attention = sys.modules.get("timm.layers.attention")
    blocks = getattr(model, "blocks", None)
    if (timm_attention is None or not isinstance(blocks, nn.Module) or not hasattr(model, "patch_embed")
            or not isinstance(getattr(model, "num_prefix_tokens", None), int)):
        raise MethodError(f"{refuse} has none")
    attentions = tuple(getattr(block, "attn", None) for block in blocks)
    if not attentions or not all(isinstance(attn, timm_attention.Attention) for attn in attentions):
        raise MethodError(f"{refuse} has none (its blocks are not all timm Attention blocks)")
    if getattr(model, "attn_pool", None) is not None:
        raise MethodError(f"{refuse} pools its tokens by attention (global_pool='map'), not supported")
    if class_token:
        if getattr(model, "cls_token", None) is None:
            raise MethodError(f"{refuse} has no class token")
        pool = getattr(model, "global_pool", "token")
        if pool != "token":
            raise MethodError(f"{refuse} has a class token but its head reads global_pool={pool!r}, not the class "
                              f"token")
    return ViTLayout(model, attentions, model.num_prefix_tokens)


class TransformerExplainer(Explainer):
    """Base of the transformer explainers: checks the model once (:func:`vit_layout`) and captures the
    attention probabilities (:meth:`capture`)."""

    memory_format = "contiguous"  # only the patch embedding is a convolution
    needs_class_token = True

    def __init__(self, model: nn.Module, model_name: str | None = None):
        super().__init__(model)
        self.layout = vit_layout(model, model_name or type(model).__name__, self.needs_class_token)

    def capture(self, relevance_rules: bool = False, attention_grads: bool = False):
        """:func:`methods.transformer.capture.attention_capture` on this model's attention modules."""
        return attention_capture(self.layout.attentions, relevance_rules, attention_grads)
