"""Insertion and deletion games (Petsiuk et al. 2018, RISE protocol; UCAG paper Table 1), batched.

Pixels are ordered by descending saliency (ties keep raster order); every ``step`` pixels (all three
channels together) the image moves from ``start`` to ``finish``: deletion replaces pixels by zeros in
normalised space, insertion starts from a Gaussian blur (kernel 51, sigma 50) and copies the real pixels
in. The curve holds the softmax probability of the explained class after 0, step, 2*step, ... pixels,
ceil(HW/step) + 1 points; its AUC is the trapezoid on [0, 1] (reported x100 by the scripts).
All perturbed images are built on the device by comparing each pixel's rank with the step's pixel count,
and scored in large no-grad forward batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

BLUR_KERNEL, BLUR_SIGMA = 51, 50.0


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves sampled uniformly on [0, 1]: (sum - first/2 - last/2) / (len - 1)."""
    return (curves.sum(dim=-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (curves.shape[-1] - 1)


def insertion_substrate(images: torch.Tensor) -> torch.Tensor:
    """The blurred start of the insertion game (kernel 51, sigma 50, reflect border), normalised space."""
    kernel = min(BLUR_KERNEL, 2 * (min(images.shape[-2:]) // 2) - 1)  # reflect padding needs pad < side
    return gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[BLUR_SIGMA, BLUR_SIGMA])


def deletion_substrate(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(images)


def saliency_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps -> (B, H*W) rank of each pixel in descending order, ties in raster order."""
    flat = saliency.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def num_points(pixels: int, step: int) -> int:
    """ceil(HW / step) + 1 curve points, both ends included."""
    return math.ceil(pixels / step) + 1


@torch.no_grad()
def game_curves(model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: torch.Tensor,
                mode: str, step: int, forward_batch: int = 128,
                substrate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(B, ceil(HW/step)+1) probability curves of the insertion or deletion game.

    images: (B, 3, H, W) normalised; saliency: (B, H, W) or (B, 1, H, W) at the same size.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    batch, channels, height, width = images.shape
    saliency = saliency.reshape(batch, height, width)
    if mode == "deletion":
        start, finish = images, (substrate or deletion_substrate)(images)
    else:
        start, finish = (substrate or insertion_substrate)(images), images
    ranks = saliency_ranks(saliency)
    points = num_points(height * width, step)
    counts = (torch.arange(points, device=images.device) * step).clamp(max=height * width)
    curves = torch.empty(batch * points, device=images.device)
    for first in range(0, batch * points, forward_batch):
        pairs = torch.arange(first, min(first + forward_batch, batch * points), device=images.device)
        image_index, point_index = pairs // points, pairs % points
        changed = (ranks[image_index] < counts[point_index, None]).view(-1, 1, height, width)
        perturbed = torch.where(changed, finish[image_index], start[image_index])
        probabilities = torch.softmax(model(perturbed).float(), dim=1)
        curves[pairs] = probabilities.gather(1, targets[image_index, None])[:, 0]
    return curves.view(batch, points)
