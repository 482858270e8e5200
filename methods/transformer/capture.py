"""Attention probabilities of timm ViT blocks, captured without editing the model's code.

timm's ``Attention`` computes ``softmax(q k^T * scale) @ v`` either fused, through
``F.scaled_dot_product_attention`` (SDPA, the default ``fused_attn = True``), or step by step. The fused
kernel never shows the probabilities. :func:`attention_capture` therefore

* switches every listed ``Attention`` module to its fused path (``fused_attn = True``), so each block makes
  exactly one SDPA call whatever the user chose, and
* enters :class:`AttentionMode`, a :class:`torch.overrides.TorchFunctionMode` under which every SDPA call is
  computed explicitly by :func:`explicit_attention`: ``P = softmax(q k^T * scale + mask)``, ``P @ v``, the
  same arithmetic as SDPA's reference math up to float rounding, honouring ``attn_mask`` (boolean: True
  takes part; float: added to the scores), ``is_causal``, ``scale``, ``dropout_p`` and ``enable_gqa``.
  The mode records each P (``(B, heads, N, N)``) in call order.

On exit the mode is popped and each module's ``fused_attn`` is put back as it was (also when the forward
raises). No hook is registered and no parameter or buffer is touched.

With ``relevance_rules`` the mode also runs the CP-LRP forward of :mod:`methods.transformer.rules`
(value-identical, with some factors detached so that Gradient x Input is a conservative relevance
propagation); P is then a constant of the backward (the CP-LRP attention rule) and, with
``attention_grads``, a leaf whose gradient is the LRP-modified gradient of the output with respect to P.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from methods.transformer import rules

SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_probabilities(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                            is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` over the keys: (..., L, S), SDPA's attention weights.

    scale: default ``1 / sqrt(E)`` (E = query.size(-1)). attn_mask: boolean (True = may attend) or added to
    the scores; broadcast to (..., L, S). is_causal: query i attends keys 0..i (top-left aligned, as SDPA).
    enable_gqa: key heads repeated to the query heads (grouped-query attention)."""
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention takes attn_mask or is_causal, not both")
    key = _repeat_heads(key, query) if enable_gqa else key
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    length, source = query.shape[-2], key.shape[-2]
    if is_causal:
        allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.softmax(dim=-1)


def _repeat_heads(tensor: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Key/value heads repeated to the number of query heads (dim -3), as SDPA's ``enable_gqa``."""
    groups = query.shape[-3] // tensor.shape[-3]
    return tensor.repeat_interleave(groups, dim=-3) if groups > 1 else tensor


def explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, *, on_probabilities=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` computed step by step (same arguments): ``P @ v`` with ``P`` from
    :func:`attention_probabilities`. ``on_probabilities(P)`` may record P or return a replacement used in its
    place (same values). Dropout, when ``dropout_p > 0``, is applied to P after that call, as SDPA does."""
    probabilities = attention_probabilities(query, key, attn_mask, is_causal, scale, enable_gqa)
    if on_probabilities is not None:
        probabilities = on_probabilities(probabilities)
    if dropout_p > 0:
        probabilities = torch.dropout(probabilities, dropout_p, train=True)
    value = _repeat_heads(value, query) if enable_gqa else value
    return probabilities @ value


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """SDPA's positional and keyword arguments as one keyword dict."""
    if len(args) > len(_SDPA_ARGS):
        raise TypeError(f"scaled_dot_product_attention takes at most {len(_SDPA_ARGS)} arguments")
    bound = dict(zip(_SDPA_ARGS, args, strict=False))
    bound.update(kwargs)
    return bound


class AttentionMode(TorchFunctionMode):
    """Within the block, SDPA calls run :func:`explicit_attention` and their probabilities P are recorded in
    :attr:`attentions` (call order); every other torch call runs unchanged unless ``relevance_rules``.

    relevance_rules: LayerNorm, GELU and SiLU run the value-identical CP-LRP forms of
    :mod:`methods.transformer.rules`, and P is detached (a constant for everything below it).
    attention_grads: the recorded P can be differentiated against: with ``relevance_rules`` a fresh leaf
    (its gradient is then the LRP-modified one); otherwise P stays in the model's graph, or becomes a leaf
    when nothing before it requires grad (a frozen model), so the target gradient dS/dP always exists.
    """

    def __init__(self, relevance_rules: bool = False, attention_grads: bool = False):
        super().__init__()
        self.relevance_rules, self.attention_grads = relevance_rules, attention_grads
        self.attentions: list[torch.Tensor] = []

    def _take(self, probabilities: torch.Tensor) -> torch.Tensor:
        if self.relevance_rules:
            probabilities = probabilities.detach().requires_grad_(self.attention_grads)
        elif self.attention_grads and not probabilities.requires_grad and torch.is_grad_enabled():
            probabilities = probabilities.detach().requires_grad_(True)
        self.attentions.append(probabilities)
        return probabilities

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            return explicit_attention(**sdpa_arguments(args, kwargs), on_probabilities=self._take)
        if self.relevance_rules:
            rule = rules.IDENTITY_RULES.get(func)
            if rule is not None:
                return rule(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def fused_path(attentions: Sequence[nn.Module]) -> Iterator[None]:
    """Every module of ``attentions`` (timm ``Attention``, which sets ``fused_attn`` in its constructor) on its
    SDPA path; each flag is restored on exit, also after an exception."""
    saved = [(module, module.fused_attn) for module in attentions]
    try:
        for module in attentions:
            module.fused_attn = True
        yield
    finally:
        for module, flag in saved:
            module.fused_attn = flag


@contextmanager
def attention_capture(attentions: Sequence[nn.Module], relevance_rules: bool = False,
                      attention_grads: bool = False) -> Iterator[AttentionMode]:
    """Run the model inside the block: ``mode.attentions`` then holds one P per SDPA call (see the module
    docstring). ``attentions``: the model's timm ``Attention`` modules, switched to their fused path."""
    mode = AttentionMode(relevance_rules, attention_grads)
    with fused_path(attentions), mode:
        yield mode
