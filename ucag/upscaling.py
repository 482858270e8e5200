"""Psi(U(I, rho, n), alpha): UCAG's crops, each upscaled by alpha with bicubic interpolation (paper Eq. 1).

The values are those of ``F.interpolate(crop, size, mode="bicubic", align_corners=False)`` on every crop.
On a CPU PyTorch's bicubic kernel costs as much as 8 % of an EfficientNet-Lite0 forward of the crops, so
there the same interpolation runs as two matrix products: each axis's bicubic weights are read off
``F.interpolate`` itself (an upscaled one-hot basis, so both agree by construction); rows are interpolated
once per band of crops sharing their rows (n bands instead of n*n crops), and columns crop by crop with
the weights cut into blocks of output columns that each read a narrow span of input columns. In float64
both agree to 1e-12; in float32 this path is the closer one to the exact values (9e-7 vs the kernel's 7e-5
on unit-variance input, whose float32 weights carry rounding). Other devices use the kernel.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ucag.geometry import CropGrid

# Output columns per block of the column pass: each block reads about block * (input / output) + 3 columns.
COLUMN_BLOCK = 48


@lru_cache(maxsize=32)
def _axis_weights(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) float64 weights W with ``W @ v`` = PyTorch's bicubic resize of a vector ``v``
    (align_corners=False): the resize of each one-hot basis vector, the other axis left at its size."""
    basis = torch.eye(size_in, dtype=torch.float64, device="cpu").view(1, size_in, size_in, 1)
    return F.interpolate(basis, size=(size_out, 1), mode="bicubic", align_corners=False).view(size_in, size_out).T


@lru_cache(maxsize=32)
def _column_blocks(size_in: int, size_out: int) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """(span, ((first output, end output, first input), ...)): blocks of output columns and the first of the
    ``span`` consecutive input columns that hold all their nonzero weights."""
    weights = _axis_weights(size_in, size_out)
    blocks, span = [], 1
    for first in range(0, size_out, COLUMN_BLOCK):
        end = min(first + COLUMN_BLOCK, size_out)
        used = weights[first:end].ne(0).any(dim=0).nonzero().flatten()
        low, high = int(used.min()), int(used.max()) + 1
        blocks.append((first, end, low))
        span = max(span, high - low)
    blocks = [(first, end, min(low, size_in - span)) for first, end, low in blocks]
    return span, tuple(blocks)


class UpscaledCrops:
    """The n*n crops of every image of ``x`` (B, C, H, W), bicubic-resized to ``size`` = (int(ch*alpha),
    int(cw*alpha)), in :meth:`CropGrid.unfold` order (image-major, then row-major); ``crops[start:stop]``
    computes only those crops, so a chunk at a time never holds all B*n*n upscaled crops."""

    def __init__(self, x: torch.Tensor, grid: CropGrid, size: tuple[int, int]):
        self.x, self.grid, self.size = x, grid, tuple(size)
        # alpha = 1 (size = the crop's): bicubic at scale 1 samples the pixel centres, the identity, so the
        # crops are cut and not interpolated
        self.identity = self.size == tuple(grid.crop_size)
        self.separable = x.device.type == "cpu" and x.is_floating_point() and not self.identity
        self._bands = self._row_pass() if self.separable else None
        self._crops = None if self.separable else grid.unfold(x)

    def __len__(self) -> int:
        return self.x.shape[0] * self.grid.num_crops

    def _weights(self, size_in: int, size_out: int) -> torch.Tensor:
        return _axis_weights(size_in, size_out).to(self.x.dtype)

    def _row_pass(self) -> torch.Tensor:
        """(B, n, C, oh, W): the rows of each band of crops (crop row i) interpolated to oh."""
        ch = self.grid.crop_size[0]
        rows = torch.tensor(self.grid.row_starts, device="cpu")[:, None] + torch.arange(ch, device="cpu")
        bands = self.x[:, :, rows].transpose(1, 2)                    # (B, n, C, ch, W)
        with torch.autocast("cpu", enabled=False):
            return torch.matmul(self._weights(ch, self.size[0]), bands)

    def __getitem__(self, chunk: slice) -> torch.Tensor:
        start, stop, _ = chunk.indices(len(self))
        if self.identity:
            return self._crops[start:stop]
        if not self.separable:
            return F.interpolate(self._crops[start:stop], size=self.size, mode="bicubic", align_corners=False)
        n, cw, out_width = self.grid.n, self.grid.crop_size[1], self.size[1]
        crop = torch.arange(start, stop, device="cpu")
        image, row, col = crop // (n * n), crop // n % n, crop % n
        bands = self._bands[image, row]                                # (k, C, oh, W)
        weights = self._weights(cw, out_width)
        span, blocks = _column_blocks(cw, out_width)
        col_starts = torch.tensor(self.grid.col_starts, device="cpu")[col]
        out = bands.new_empty(*bands.shape[:-1], out_width)
        with torch.autocast("cpu", enabled=False):
            for first, end, low in blocks:
                columns = (col_starts[:, None] + low + torch.arange(span, device="cpu")).view(-1, 1, 1, span)
                read = bands.gather(-1, columns.expand(*bands.shape[:-1], span))   # (k, C, oh, span)
                out[..., first:end] = torch.matmul(read, weights[first:end, low:low + span].T)
        return out
