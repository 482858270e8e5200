"""Turning raw maps into pictures and metric inputs: ReLU, resize, per-map min-max (and a caller's blur)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (1, h, w) map of a (B, 1, h, w) batch to [0, 1].

    Constant maps (span within float rounding of their magnitude, e.g. a resized constant) become zeros.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    span = high - low
    rounding = 16 * torch.finfo(maps.dtype).eps * torch.maximum(high.abs(), low.abs())
    varies = span > rounding
    return torch.where(varies, (maps - low) / torch.where(varies, span, torch.ones_like(span)),
                       torch.zeros_like(maps))


def resize_maps(maps: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of (B, 1, h, w) maps, anti-aliased when shrinking.

    ``antialias=False``: plain bilinear interpolation also when shrinking, as TorchRay's pointing-game
    benchmark resizes its saliency maps (the pointing game's reference protocol).
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    shrinking = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=antialias and shrinking)


def official_ranking_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The maps the official code's insertion/deletion game ranks for its raw methods
    (:attr:`methods.base.Explainer.official_raw`): the raw signed (B, 1, h, w) maps, float32, bilinear-resized
    to ``size`` (align_corners=False, no anti-aliasing), with no ReLU, min-max or blur."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def finalize_maps(maps: torch.Tensor, size: tuple[int, int] | None = None, relu: bool = True,
                  blur: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  antialias: bool = True) -> torch.Tensor:
    """Raw (B, 1, h, w) maps -> [0, 1] maps at ``size``: ReLU, resize, min-max.

    ``blur`` (a smoothing of (B, 1, h, w) maps, e.g. :func:`ucag.protocol.official_blur`) reproduces the
    official code's UCAG output: ReLU, min-max, blur in the model's input frame, then the resize (no second
    min-max, as there). ``antialias``: see :func:`resize_maps`.
    """
    maps = maps.float()
    if relu:
        maps = maps.clamp(min=0)
    if blur is not None:
        maps = blur(min_max(maps))
        return resize_maps(maps, size, antialias) if size else maps
    if size:
        maps = resize_maps(maps, size, antialias)
    return min_max(maps)


def finalize_signed(maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Signed relevance maps -> [-1, 1] at ``size``: resize, divide by the largest magnitude (sign kept)."""
    maps = maps.float()
    if size:
        maps = resize_maps(maps, size)
    scale = maps.flatten(1).abs().max(dim=1).values.view(-1, 1, 1, 1)
    return torch.where(scale > 0, maps / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(maps))


def zero_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where a final (B, 1, h, w) map is all zero (a constant raw map after the ReLU and
    min-max), a map that ranks pixels in raster order."""
    return maps.flatten(1).eq(0).all(dim=1)
