"""What the rest of the toolkit needs to know about a classifier: the network, its CAM layer, its input."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from models.tokens import TokenLayout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """A classifier ready for explanation.

    name: registry name. model: the network in eval mode. target_layer: dotted module name whose
    output is the CAM activation A. activation_post: an idempotent op applied to that output before it
    is used as A (DenseNet's final ReLU lives in ``forward``, not in a module), or, for transformers, the
    :class:`~models.tokens.TokenLayout` that turns the layer's tokens into A (every block of the model
    shares it; see :attr:`token_layout`). input_size: (H, W) the
    image is resized to, without cropping (keep_aspect: the shorter side to input_size[0] instead, the
    TorchRay protocol). min_side: smallest input side the architecture accepts. multilabel: sigmoid
    outputs (VOC/COCO pointing-game models). extra: further facts (timm models: ``resize_interpolation``,
    ``crop_pct``, ``fixed_input``: whether the model only takes ``input_size``, ``input_multiple``: pixels
    beyond a multiple of it are ignored).
    """

    name: str
    model: nn.Module
    target_layer: str
    categories: list[str]
    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    activation_post: Callable[[torch.Tensor], torch.Tensor] | TokenLayout | None = None
    min_side: int = 32
    weights: str = "default"
    keep_aspect: bool = False
    multilabel: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def layer(self) -> nn.Module:
        """The target layer module."""
        return self.model.get_submodule(self.target_layer)

    @property
    def token_layout(self) -> str | None:
        """'tokens' (ViT: prefix + patch tokens), 'nhwc' (Swin) or None (a (B, C, h, w) layer)."""
        return self.activation_post.layout if isinstance(self.activation_post, TokenLayout) else None

    @property
    def num_classes(self) -> int:
        return len(self.categories)
