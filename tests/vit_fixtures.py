"""Tiny timm ViTs with random weights for the transformer explainers' tests (milliseconds per forward)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from models.spec import ModelSpec


def tiny_vit(seed: int = 0, cls=VisionTransformer, **overrides) -> torch.nn.Module:
    """A 2-block ViT on 32 px inputs, patches of 8, 16 channels, 2 heads, 5 classes, in eval mode; any
    constructor argument can be overridden (``depth``, ``reg_tokens``, ``dynamic_img_size``, ...)."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    kwargs.update(overrides)
    return cls(**kwargs).eval()


def tiny_vit_spec(num_classes: int = 10, seed: int = 0) -> ModelSpec:
    """The tiny ViT for the registry-wide tests: any input size (dynamic size, padded to whole patches, as
    UCAG's rescaled crops need)."""
    model = tiny_vit(seed, num_classes=num_classes, dynamic_img_size=True, dynamic_img_pad=True)
    return ModelSpec("tiny_vit", model, "", [str(i) for i in range(num_classes)])
