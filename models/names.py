"""Names every model module shares: the prefix of timm models and the ImageNet class names."""
from __future__ import annotations

import torchvision

TIMM_PREFIX = "timm:"  # timm:<name>: any timm classifier (models.timm_models)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in the standard (torchvision) order."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
