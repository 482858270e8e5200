"""What the rest of the toolkit needs to know about a classifier: the network, its CAM layer, its input."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.tokens import TokenLayout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A classifier ready for explanation, frozen: a changed fact is a new spec (:meth:`with_layer`,
    ``dataclasses.replace``). The network itself stays an ordinary module (``spec.model.to(...)``).
    ``eq=False``: two specs are the same spec only when they are the same object (they hold live networks).
    """

    name: str
    """Registry name (``resnet50``, ``timm:<model>``, ``vgg16_20``)."""
    model: nn.Module
    """The network, in eval mode."""
    target_layer: str
    """Dotted module name whose output is the CAM activation A."""
    categories: Sequence[str]
    """Class names, index = logit; the builders pass tuples."""
    input_size: tuple[int, int] = (224, 224)
    """(H, W) the image is resized to, without cropping."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Normalisation mean per RGB channel, on [0, 1] pixels."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Normalisation std per RGB channel."""
    activation_post: Callable[[torch.Tensor], torch.Tensor] | TokenLayout | None = None
    """An idempotent op applied to the layer output before it is used as A (DenseNet's final ReLU lives in
    ``forward``, not in a module), or, for transformers, the :class:`~models.tokens.TokenLayout` that turns
    the layer's tokens into A (every block of the model shares it; see :attr:`token_layout`)."""
    min_side: int = 32
    """Smallest input side the architecture accepts."""
    weights: str = "default"
    """What the weights came from: 'default', 'random' or a state_dict path (run.json ``weights``)."""
    keep_aspect: bool = False
    """Resize the shorter side to ``input_size[0]`` instead of to ``input_size`` (the TorchRay protocol)."""
    multilabel: bool = False
    """Sigmoid outputs (VOC/COCO pointing-game models)."""
    fixed_input: bool = False
    """The model takes ``input_size`` only (ViT position embeddings, MaxViT partitions): UCAG resizes its
    crops to it."""
    input_multiple: int | None = None
    """Pixels beyond a multiple of this (a timm patch size) are ignored; None: every pixel is read."""
    resize_interpolation: str = "bilinear"
    """The interpolation of the model's pretrained config (timm); only 'bicubic' changes the resize."""
    resize_antialias: bool = True
    """Anti-aliased resize; False for TorchRay's Caffe checkpoints (plain bilinear interpolation)."""
    crop_pct: float | None = None
    """timm's pretrained centre-crop fraction, recorded, not applied (maps cover the whole image)."""
    caffe: bool = False
    """A TorchRay/Caffe checkpoint, converted on load (Caffe architecture and preprocessing)."""
    timm_model: str | None = None
    """The pretrained tag timm resolved the name to (``architecture.tag``; run.json ``timm_model``)."""

    def with_layer(self, target_layer: str) -> ModelSpec:
        """The same classifier with another CAM layer. A token layout holds for every block of the model and
        is kept; any other ``activation_post`` (DenseNet's ReLU) belongs to the default layer and is dropped."""
        layout = self.activation_post if isinstance(self.activation_post, TokenLayout) else None
        return dataclasses.replace(self, target_layer=target_layer, activation_post=layout)

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
        """K, the number of classes (logits)."""
        return len(self.categories)
