"""Image -> model input: resize to the model's input size without cropping, then mean/std normalisation."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.spec import ModelSpec


def to_tensor(image: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) float tensor in [0, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float().div_(255.0)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, anti-aliased resize of a (3, H, W) or (B, 3, H, W) float image to ``size``."""
    batch = image if image.dim() == 4 else image[None]
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    return batch if image.dim() == 4 else batch[0]


def normalize(batch: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """(x - mean) / std with the model's statistics."""
    mean = torch.tensor(spec.mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


def model_input_size(height: int, width: int, spec: ModelSpec) -> tuple[int, int]:
    """Size an (height, width) image is resized to: the model's input, or shorter side = input side."""
    if not spec.keep_aspect:
        return spec.input_size
    side = spec.input_size[0]
    if height <= width:
        return side, max(1, round(width * side / height))
    return max(1, round(height * side / width)), side


def preprocess_one(image: np.ndarray, spec: ModelSpec, device: torch.device | str) -> torch.Tensor:
    """One uint8 RGB image -> a normalised (1, 3, h, w) batch at :func:`model_input_size`."""
    size = model_input_size(*image.shape[:2], spec)
    return normalize(resize_image(to_tensor(image, device), size)[None], spec)


def preprocess(images: Sequence[np.ndarray], spec: ModelSpec, device: torch.device | str) -> torch.Tensor:
    """uint8 RGB images of any sizes -> one normalised (B, 3, H, W) batch at ``spec.input_size``."""
    resized = [resize_image(to_tensor(image, device), spec.input_size) for image in images]
    return normalize(torch.stack(resized), spec)
