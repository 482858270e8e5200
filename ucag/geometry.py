"""Spatial unfoldment U(I, rho, n) and its inverse fold V(., Gamma) for an n x n grid of crops.

Crop size ch x cw = int(c*H/224) x int(c*W/224) (c in the 224-pixel frame, rho = c/224), stride
(H - ch) // (n - 1) per axis; when that does not divide evenly the last crop is placed flush with the
border, so every pixel is covered. Crop (i, j) is number i*n + j (row-major), as ``x.unfold``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral, Real

import torch

from ucag.errors import SettingError, UCAGError

REFERENCE_SIDE = 224  # c is given in a 224-pixel frame (paper: rho = c / 224)


def check_crop(crop) -> float:
    """c (rho * 224): the crop side in the 224-px frame, a finite number in (0, 224] (as -c/--crop-size)."""
    if isinstance(crop, bool) or not isinstance(crop, Real) or not (math.isfinite(crop) and 0 < crop <= REFERENCE_SIDE):
        raise SettingError("crop", f"in (0, {REFERENCE_SIDE}] (the crop side in the 224-px frame)", crop)
    return crop


def check_n(n) -> int:
    """n: crops per side, an integer >= 2 (as -n/--num-patches)."""
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 2:
        raise SettingError("n", "an integer of at least 2", n)
    return int(n)


def crop_starts(size: int, crop: int, n: int) -> list[int]:
    """First row (or column) of each of the n crops along an axis of ``size`` pixels."""
    if not 1 <= crop <= size:
        raise UCAGError(f"crop of {crop} px does not fit an axis of {size} px")
    stride = (size - crop) // (n - 1)
    starts = [stride * i for i in range(n)]
    starts[-1] = size - crop
    return starts


@dataclass(frozen=True)
class CropGrid:
    """Geometry of UCAG's n x n crops of an (H, W) input; c is the crop size in the 224 frame."""

    height: int
    width: int
    crop: float = 124
    n: int = 6

    def __post_init__(self):
        check_n(self.n)
        check_crop(self.crop)
        if self.crop_size[0] < 1 or self.crop_size[1] < 1:
            raise UCAGError(f"crop size c={self.crop} gives an empty crop on a {self.height}x{self.width} input")

    @property
    def crop_size(self) -> tuple[int, int]:
        """(ch, cw) in pixels."""
        return int(self.crop * self.height / REFERENCE_SIDE), int(self.crop * self.width / REFERENCE_SIDE)

    @property
    def stride(self) -> tuple[int, int]:
        """(sh, sw): spacing of all crops but possibly the last on each axis."""
        ch, cw = self.crop_size
        return (self.height - ch) // (self.n - 1), (self.width - cw) // (self.n - 1)

    @cached_property
    def row_starts(self) -> list[int]:
        return crop_starts(self.height, self.crop_size[0], self.n)

    @cached_property
    def col_starts(self) -> list[int]:
        return crop_starts(self.width, self.crop_size[1], self.n)

    @property
    def num_crops(self) -> int:
        return self.n * self.n

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(top, left, bottom, right) of each crop, bottom/right exclusive, in crop order."""
        ch, cw = self.crop_size
        return [(top, left, top + ch, left + cw) for top in self.row_starts for left in self.col_starts]

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ch, cw = self.crop_size
        rows = torch.tensor(self.row_starts, device=device)[:, None] + torch.arange(ch, device=device)
        cols = torch.tensor(self.col_starts, device=device)[:, None] + torch.arange(cw, device=device)
        return rows, cols  # (n, ch), (n, cw)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * n * n, C, ch, cw): every crop of every image, image-major. One copy: the crops
        are picked out of a view of all (ch, cw) windows (3-6 x faster than two gathers and a permute)."""
        batch, channels = x.shape[:2]
        ch, cw = self.crop_size
        windows = x.unfold(2, ch, 1).unfold(3, cw, 1).permute(0, 2, 3, 1, 4, 5)  # (B, H-ch+1, W-cw+1, C, ch, cw)
        rows = torch.tensor(self.row_starts, device=x.device)
        cols = torch.tensor(self.col_starts, device=x.device)
        crops = windows[:, rows[:, None], cols[None, :]]  # (B, n, n, C, ch, cw), contiguous
        return crops.reshape(batch * self.num_crops, channels, ch, cw)

    def fold(self, maps: torch.Tensor) -> torch.Tensor:
        """Sum (B * n * n, ch, cw) crop maps back into (B, 1, H, W) (no division)."""
        ch, cw = self.crop_size
        batch = maps.shape[0] // self.num_crops
        rows, cols = self._indices(maps.device)
        # linear pixel index of every crop pixel, in the same order as the crop maps
        index = (rows[:, None, :, None] * self.width + cols[None, :, None, :]).flatten()
        out = torch.zeros(batch, self.height * self.width, device=maps.device, dtype=maps.dtype)
        out.index_add_(1, index, maps.reshape(batch, -1))
        return out.view(batch, 1, self.height, self.width)

    def duplication(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gamma: (1, 1, H, W) number of crops covering each pixel."""
        ones = torch.ones(self.num_crops, *self.crop_size, device=device, dtype=dtype)
        return self.fold(ones)
