"""Image -> model input: resize to the model's input size without cropping, then mean/std normalisation."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.spec import ModelSpec


def memory_format_of(model: torch.nn.Module) -> torch.memory_format:
    """torch.channels_last when the model's convolution weights are stored so (``model.to(memory_format=
    torch.channels_last)``), else torch.contiguous_format; 1x1 kernels, which fit both, are not looked at."""
    for parameter in model.parameters():
        if parameter.dim() == 4 and parameter.shape[-2:].numel() > 1 and parameter.shape[1] > 1:
            if parameter.is_contiguous():
                return torch.contiguous_format
            if parameter.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
    return torch.contiguous_format


def to_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(H, W, 3) uint8 array or tensor -> (3, H, W) float tensor in [0, 1] on ``device``. To a GPU the uint8
    pixels go from page-locked memory (pinned here unless a pinning DataLoader already did) without
    blocking the host; the conversion to float happens on the device."""
    pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    device = torch.device(device)
    if device.type == "cuda":
        pixels = (pixels if pixels.is_pinned() else pixels.pin_memory()).to(device, non_blocking=True)
    else:
        pixels = pixels.to(device)
    return pixels.permute(2, 0, 1).float().div_(255.0)


def resize_image(image: torch.Tensor, size: tuple[int, int], antialias: bool = True,
                 mode: str = "bilinear") -> torch.Tensor:
    """Bilinear (or ``mode='bicubic'``; ``align_corners=False``), by default anti-aliased, resize of a
    (3, H, W) or (B, 3, H, W) float image in [0, 1] to ``size``; bicubic overshoot is clipped to [0, 1] as
    PIL's uint8 result is."""
    batch = image if image.dim() == 4 else image[None]
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=antialias)
        if mode == "bicubic":
            batch = batch.clamp_(0.0, 1.0)
    return batch if image.dim() == 4 else batch[0]


def resize_mode(spec: ModelSpec) -> str:
    """'bicubic' when the model's preprocessing says so (``spec.resize_interpolation``, timm's pretrained
    configs), else 'bilinear'."""
    return "bicubic" if spec.resize_interpolation == "bicubic" else "bilinear"


def normalize(batch: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(x - mean) / std with the model's statistics."""
    mean = torch.tensor(spec.mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


def model_input_size(height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """Size an (height, width) image is resized to: the model's input, or (``spec.keep_aspect``) the shorter
    side at the input side and the longer one truncated, ``int(side * long / short)``, as torchvision's
    ``Resize(side)`` and TorchRay's benchmark transforms do (375 x 500 -> 224 x 298)."""
    if not spec.keep_aspect:
        return spec.input_size
    side = spec.input_size[0]
    if width <= height:
        return int(side * height / width), side
    return side, int(side * width / height)


def preprocess_one(image: np.ndarray, spec: ModelSpec, device: torch.device | str) -> torch.Tensor:
    """One uint8 RGB image -> a normalised (1, 3, h, w) batch at :func:`model_input_size`.

    The resize is anti-aliased unless ``spec.resize_antialias`` is False (TorchRay's Caffe
    checkpoints, whose benchmark transform is plain bilinear interpolation of the [0, 1] image), and bicubic
    when :func:`resize_mode` says so.
    """
    size = model_input_size(*image.shape[:2], spec)
    resized = resize_image(to_tensor(image, device), size, spec.resize_antialias, resize_mode(spec))
    return normalize(resized[None], spec)


def preprocess(images: Sequence[np.ndarray | torch.Tensor], spec: ModelSpec,
               device: torch.device | str) -> torch.Tensor:
    """uint8 RGB images of any sizes -> one normalised (B, 3, H, W) batch at ``spec.input_size`` (resized as
    :func:`resize_mode` says)."""
    mode = resize_mode(spec)
    resized = [resize_image(to_tensor(image, device), spec.input_size, mode=mode) for image in images]
    return normalize(torch.stack(resized), spec)
