"""How UCAG's conquer step joins the partial maps: the paper's fold V(., Gamma) or a Gaussian overlap-add.

With M_s the confidence-weighted partial maps already resized to their crops (paper Eq. 5):

``constant`` (the paper, Eq. 6):  M = V(M_s, Gamma) = sum_s M_s / Gamma
    every crop counts with the same weight at all its pixels; Gamma (the duplication matrix) counts the
    crops covering each pixel. The sum jumps wherever a crop starts or ends, so the map shows the crop grid
    (every 20 px for the defaults).

``gaussian`` (an option, not the paper):  M = sum_s w * M_s / sum_s w
    w is a separable Gaussian window over the crop, centred on it, with sigma = SIGMA_FRACTION times the
    crop side on each axis; the sum is divided by the folded windows (sum_s w, the weighted counterpart of
    Gamma) instead of Gamma. A partial map fades out towards its crop's border, so no crop edge makes a
    step: the overlap-add of sliding-window inference (e.g. MONAI's ``sliding_window_inference`` with
    ``mode="gaussian"``; its default sigma, 0.125 of the window's side, is ours). The confidence weight Y_s is part
    of M_s under both blends: the window only decides how overlapping crops are averaged.

Both are weighted means of the partial maps covering a pixel: a constant partial map folds to that constant.
"""
from __future__ import annotations

import torch

from ucag.errors import SettingError, UCAGError
from ucag.geometry import CropGrid

BLENDS = ("constant", "gaussian")

# sigma of the Gaussian window as a fraction of the crop side (per axis), MONAI's default. With the paper's
# geometry (124-px crops, stride 20 px) sigma = 15.5 px: a crop's edge keeps exp(-8) = 3e-4 of its centre's
# weight, so no crop edge makes a visible step, and neighbouring windows (20 px apart, 1.3 sigma) still
# overlap smoothly. 0.25 (sigma 31 px) keeps exp(-2) = 0.14 at the edge: the grid stays faintly visible
# (measured on 23 photos: the mean jump across crop edges is 2.4 x the jump elsewhere, 1.0 x with 0.125 and
# 6.6 x with the constant fold), for insertion/deletion AUCs within noise of 0.125's (README, "Seamless UCAG
# pictures"). With few, far-apart crops (stride well above sigma) the Gaussian transitions between
# neighbouring crop centres get steeper, still without steps at crop edges.
SIGMA_FRACTION = 0.125


def check_blend(blend: str) -> str:
    """One of BLENDS (which of them a protocol allows: :meth:`ucag.protocol.Protocol.check_blend`)."""
    if blend not in BLENDS:
        raise SettingError("blend", f"one of {', '.join(BLENDS)}", blend)
    return blend


def gaussian_window(crop_size: tuple[int, int], sigma_fraction: float = SIGMA_FRACTION,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(ch, cw) separable Gaussian window w = g_h g_w^T, each factor exp(-(i - (side-1)/2)^2 / (2 sigma^2))
    with sigma = sigma_fraction * side: 1 at the centre (odd sides), symmetric, never zero."""
    if not sigma_fraction > 0:
        raise SettingError("sigma_fraction", "positive", sigma_fraction)

    def factor(side: int) -> torch.Tensor:
        offsets = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
        return torch.exp(-offsets.square() / (2 * (sigma_fraction * side) ** 2))

    rows, cols = (factor(side) for side in crop_size)
    window = (rows[:, None] * cols[None, :]).to(device=device, dtype=dtype)
    if not bool(window.min() > 0):  # the divisor sum_s w must not vanish where one crop alone covers a pixel
        raise UCAGError(f"sigma_fraction={sigma_fraction} is too small: the window underflows to 0 in {dtype}")
    return window


def blend_fold(grid: CropGrid, partial: torch.Tensor, blend: str = "constant", gamma_offset: int = 0,
               sigma_fraction: float = SIGMA_FRACTION) -> torch.Tensor:
    """Fold (B * n * n, ch, cw) partial maps M_s into (B, 1, H, W) maps M with ``blend`` (see the module).

    constant: V(M_s, Gamma) = fold(M_s) / (Gamma + gamma_offset); the offset is the protocol's
    (:attr:`ucag.protocol.Protocol.gamma_offset`: 0 for the paper, 1 for the official code's count).
    gaussian: fold(w * M_s) / fold(w), one window for every crop (built once, broadcast, no loop over crops);
    only a protocol without an offset allows it (:meth:`ucag.protocol.Protocol.fold` checks the blend)."""
    check_blend(blend)
    if blend == "constant":
        gamma = grid.duplication(partial.device, partial.dtype)
        return grid.fold(partial) / (gamma + gamma_offset if gamma_offset else gamma)
    window = gaussian_window(grid.crop_size, sigma_fraction, partial.device, partial.dtype)
    return grid.fold(partial * window) / window_sum(grid, window)


def window_sum(grid: CropGrid, window: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W): sum of the windows of the crops covering each pixel (Gamma for a window of ones)."""
    return grid.fold(window.expand(grid.num_crops, *window.shape))
