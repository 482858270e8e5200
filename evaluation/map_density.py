"""Positive and negative map density (CAMERAS, Jalwana et al. 2021; UCAG paper Eq. 7-8, Table 5).

rho+ = psi(f(M * X)) * (h*w) / sum(M),  rho- = psi(f((1 - M) * X)) * (h*w) / sum(1 - M),
with M the [0, 1] map at the input size, X the normalised input (masked pixels become zeros in normalised
space, i.e. the dataset mean colour, the deletion game's substrate) and psi the softmax probability of
the explained class. A map with sum(M) = 0 (or sum(1-M) = 0) has no defined density: NaN, left out of means.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def map_density(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) positive and negative densities for (B, 3, H, W) images and (B, 1, H, W) maps in [0, 1]."""
    batch = images.shape[0]
    maps = maps.reshape(batch, 1, *images.shape[-2:]).to(images.dtype)
    pixels = maps.shape[-1] * maps.shape[-2]
    logits = model(torch.cat([maps * images, (1 - maps) * images]))
    psi = torch.softmax(logits.float(), dim=1).gather(1, torch.cat([targets, targets])[:, None])[:, 0]
    inside, outside = maps.flatten(1).sum(1).float(), (1 - maps).flatten(1).sum(1).float()
    nan = torch.full_like(inside, float("nan"))
    positive = torch.where(inside > 0, psi[:batch] * pixels / inside.clamp(min=1e-12), nan)
    negative = torch.where(outside > 0, psi[batch:] * pixels / outside.clamp(min=1e-12), nan)
    return positive, negative
