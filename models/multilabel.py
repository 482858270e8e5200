"""Multi-label VGG16 / ResNet50 for the pointing game: 20 (VOC07) or 80 (COCO14) sigmoid outputs.

``--weights PATH`` takes either
- a torchvision-layout state_dict of ``vgg16(num_classes=K)`` / ``resnet50(num_classes=K)`` (your own
  fine-tuning; ImageNet mean/std preprocessing), or
- a TorchRay benchmark checkpoint (``vgg16_voc-b050e8c3.pth.tar``, ``resnet50_coco-e99468c5.pth.tar``, ...;
  the EBP Caffe models converted to PyTorch). It is recognised by its keys and converted on load: VGG
  classifier keys 0/2/4 -> 0/3/6 with flattened weights, ResNet BatchNorm/Scale pairs ``bnN.{0,1}.*`` ->
  ``bnN.*``, first convolution BGR -> RGB; the Caffe architecture details are restored (ResNet conv1 with
  bias, stride-2 1x1 convolutions, 3x3/2 max-pool without padding, all max-pools with ``ceil_mode``), and
  the Caffe preprocessing is used (0..255 pixels minus the RGB mean 123.68/116.779/103.939) after a plain
  bilinear resize without anti-aliasing, as TorchRay's benchmark transform for these models.
Images keep their aspect ratio, the shorter side resized to 224 and the longer one truncated
(``int(224 * long / short)``, as torchvision's ``Resize(224)`` and TorchRay; 375 x 500 -> 224 x 298).
"""
from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from models.errors import ModelError
from models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from models.target_layer import check_spatial_layer
from models.weights import check_fits, read_state_dict, warn_random

MULTILABEL_ARCHS = {"vgg16": "features.29", "resnet50": "layer4"}
CAFFE_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)


def is_torchray_checkpoint(arch: str, state_dict: dict) -> bool:
    if arch == "vgg16":
        return "classifier.2.weight" in state_dict and "classifier.3.weight" not in state_dict
    return "conv1.bias" in state_dict or any(re.match(r".*bn\d\.[01]\.", key) for key in state_dict)


def convert_torchray_state_dict(arch: str, state_dict: dict) -> dict:
    """TorchRay/Caffe key layout -> torchvision layout (RGB first convolution)."""
    converted = {}
    for key, value in state_dict.items():
        if arch == "vgg16":
            key = {"classifier.2.weight": "classifier.3.weight", "classifier.2.bias": "classifier.3.bias",
                   "classifier.4.weight": "classifier.6.weight", "classifier.4.bias": "classifier.6.bias"}.get(key, key)
            if key.startswith("classifier") and key.endswith("weight"):
                value = value.reshape(value.shape[0], -1)
        else:
            key = re.sub(r"bn(\d)\.[01]\.", r"bn\1.", key)
            key = re.sub(r"downsample\.(\d)\.[01]\.", r"downsample.\1.", key)
        converted[key] = value
    first = "features.0.weight" if arch == "vgg16" else "conv1.weight"
    converted[first] = converted[first][:, [2, 1, 0]]
    return converted


def caffe_architecture(arch: str, model: nn.Module) -> nn.Module:
    """Patch a torchvision model into the Caffe variant the TorchRay checkpoints were trained as."""
    if arch == "resnet50":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=True)
        model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        for stage in (model.layer2, model.layer3, model.layer4):
            stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    for module in model.modules():
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    return model


def load_multilabel(arch: str, categories: list[str], weights: str, device: str | torch.device = "cpu",
                    target_layer: str | None = None) -> ModelSpec:
    """A VOC/COCO multi-label classifier; ``weights`` is a checkpoint path or 'random'."""
    if arch not in MULTILABEL_ARCHS:
        raise ModelError(f"the pointing game supports --name {' or '.join(MULTILABEL_ARCHS)}, not '{arch}'")
    num_classes = len(categories)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    mean, std, caffe = IMAGENET_MEAN, IMAGENET_STD, False
    if weights == "random":
        warn_random(f"{arch} ({num_classes} classes)")
    elif weights == "default":
        raise ModelError(f"the {num_classes}-class {arch} needs --weights PATH (e.g. TorchRay's "
                        f"{arch}_{'voc' if num_classes == 20 else 'coco'}-*.pth.tar) or --weights random")
    else:
        state_dict = read_state_dict(weights)
        caffe = is_torchray_checkpoint(arch, state_dict)
        if caffe:
            state_dict = convert_torchray_state_dict(arch, state_dict)
            model = caffe_architecture(arch, model)
            mean, std = CAFFE_MEAN, CAFFE_STD
        head = state_dict.get("classifier.6.weight" if arch == "vgg16" else "fc.weight")
        if head is not None and head.shape[0] != num_classes:
            raise ModelError(f"weights file {weights} has a {head.shape[0]}-class head; this dataset has "
                            f"{num_classes} classes")
        check_fits(model, state_dict, f"a {num_classes}-class {arch}", weights)
        model.load_state_dict(state_dict)
    spec = ModelSpec(f"{arch}_{num_classes}", model.eval().to(device), target_layer or MULTILABEL_ARCHS[arch],
                     tuple(categories), mean=mean, std=std, keep_aspect=True, multilabel=True, weights=weights,
                     caffe=caffe, resize_antialias=not caffe)  # TorchRay's Caffe transform: no anti-aliasing
    if target_layer:
        check_spatial_layer(spec.model, target_layer, spec.input_size)
    return spec
