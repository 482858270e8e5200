"""How alike two batches of saliency maps are, per image: the four similarities of Adebayo et al. 2018.

Which maps: a row's raw map (signed, no ReLU or min-max) bilinear-resized to the model's input size
(:func:`input_maps`; anti-aliased only when shrinking, as every script resizes). From it:

* ``spearman``: Spearman's rank correlation of the two raw maps, ranks with average ties (as
  ``scipy.stats.spearmanr``), batched on the maps' device, correlated in float64;
* ``spearman_abs``: the same of their absolute values;
* ``ssim``: the structural similarity of the two maps min-max normalised to [0, 1] (each map alone), with
  ``skimage.metrics.structural_similarity``'s definition and defaults (7 x 7 uniform window, K1 0.01, K2 0.03,
  sample covariance, the mean over the window positions that fit inside the map) and ``data_range`` 1,
  computed in torch (float64, on the device) and checked against skimage in the tests;
* ``hog``: Pearson's correlation of the HOG features (``skimage.feature.hog``'s definition and defaults: 9
  orientations, 8 x 8-pixel cells, 3 x 3-cell blocks, L2-Hys) of the two [0, 1] maps, computed in torch
  (:func:`hog_features`) and checked against skimage in the tests.

A constant map (all zeros, a resized constant) has no ranking and no structure: every similarity involving it
is NaN, and the summaries leave NaN out of their means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.postprocess import min_max, resize_maps

FIELDS = ("spearman", "spearman_abs", "ssim", "hog")
SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03
HOG_ORIENTATIONS, HOG_CELL, HOG_BLOCK = 9, 8, 3


def input_maps(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw (B, 1, h, w) maps -> float32 (B, 1, H, W) at the input size, signed, no ReLU or min-max."""
    return resize_maps(raw.float(), size)


def constant(maps: torch.Tensor) -> torch.Tensor:
    """(B,) bool: maps whose span is within float rounding of their magnitude (what :func:`min_max` zeroes)."""
    flat = maps.flatten(1)
    high, low = flat.max(dim=1).values, flat.min(dim=1).values
    return (high - low) <= 16 * torch.finfo(maps.dtype).eps * torch.maximum(high.abs(), low.abs())


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Rows of ``values`` (B, N) -> their ranks 1..N in float64, equal values sharing their average rank
    (scipy.stats.rankdata's 'average')."""
    batch, count = values.shape
    ordered, order = values.sort(dim=1)
    position = torch.arange(count, device=values.device).expand(batch, count)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    if bool(starts.all()):  # no ties: the ranks are the positions
        return torch.empty(batch, count, dtype=torch.float64, device=values.device).scatter_(
            1, order, (position + 1).double())
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, position, 0).cummax(dim=1).values  # each sorted value's tie group: first index
    last = torch.where(ends, position, count).flip(1).cummin(dim=1).values.flip(1)  # ... and last index
    average = (first + last).double() / 2 + 1
    return torch.empty_like(average).scatter_(1, order, average)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of (B, N) tensors in float64; NaN where a row is constant."""
    a, b = a.double(), b.double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    value = (a * b).sum(dim=1) / norm
    return torch.where(norm > 0, value.clamp(-1.0, 1.0), torch.full_like(value, float("nan")))


def _window_means(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Means of (B, C, H, W) float64 maps over every size x size window that fits (valid positions), from
    the maps' integral image: a few cheap passes instead of a 49-tap filter."""
    integral = F.pad(maps.cumsum(dim=2).cumsum(dim=3), (1, 0, 1, 0))
    total = (integral[..., size:, size:] - integral[..., :-size, size:] - integral[..., size:, :-size]
             + integral[..., :-size, :-size])
    return total / (size * size)


def ssim_moments(maps: torch.Tensor) -> torch.Tensor:
    """(B, 2, h, w): the window means of a map and of its square (float64), what SSIM needs of one side."""
    maps = maps.double()
    return _window_means(torch.cat([maps, maps * maps], dim=1), SSIM_WINDOW)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0,
         moments_a: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) structural similarity of (B, 1, H, W) maps, skimage's definition (see the module), float64.
    ``moments_a``: :func:`ssim_moments` of ``a`` computed before (a reference compared many times)."""
    a, b = a.double(), b.double()
    ux, uxx = (ssim_moments(a) if moments_a is None else moments_a).unbind(dim=1)
    uy, uyy, uxy = _window_means(torch.cat([b, b * b, a * b], dim=1), SSIM_WINDOW).unbind(dim=1)
    points = SSIM_WINDOW * SSIM_WINDOW
    norm = points / (points - 1)
    vx, vy, vxy = norm * (uxx - ux * ux), norm * (uyy - uy * uy), norm * (uxy - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return index.flatten(1).mean(dim=1)


def hog_features(maps01: torch.Tensor) -> torch.Tensor:
    """(B, F) float64 HOG features of (B, 1, H, W) maps: ``skimage.feature.hog`` with its defaults, in torch on
    the maps' device. Central-difference gradients (0 on the border rows / columns), unsigned orientations in
    [0, 180) binned into 9 bins of 20 degrees (no interpolation), each 8 x 8 cell's magnitude sum / 64 per bin
    (the cells that fit), 3 x 3-cell blocks, L2-Hys normalisation (eps 1e-5, clip 0.2), raveled as
    (block row, block column, cell row, cell column, orientation)."""
    image = maps01[:, 0].double()
    g_row = torch.zeros_like(image)
    g_col = torch.zeros_like(image)
    g_row[:, 1:-1, :] = image[:, 2:, :] - image[:, :-2, :]
    g_col[:, :, 1:-1] = image[:, :, 2:] - image[:, :, :-2]
    magnitude = torch.hypot(g_col, g_row)
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)).remainder(180.0)
    width = 180.0 / HOG_ORIENTATIONS
    bins = torch.floor(orientation / width)
    bins = bins - (orientation < bins * width).double() + (orientation >= (bins + 1) * width).double()
    bins = bins.clamp(0, HOG_ORIENTATIONS - 1).long()
    votes = torch.zeros(image.shape[0], HOG_ORIENTATIONS, *image.shape[1:], dtype=torch.float64,
                        device=image.device)
    votes.scatter_(1, bins[:, None], magnitude[:, None])
    cells = F.avg_pool2d(votes, HOG_CELL)  # (B, 9, rows, cols): the cell's sum / cell area
    blocks = cells.unfold(2, HOG_BLOCK, 1).unfold(3, HOG_BLOCK, 1)  # (B, 9, br, bc, 3, 3)
    blocks = blocks.permute(0, 2, 3, 4, 5, 1).flatten(3)  # (B, br, bc, 3 * 3 * 9) in skimage's order
    eps = 1e-5
    blocks = blocks / torch.sqrt((blocks * blocks).sum(dim=3, keepdim=True) + eps ** 2)
    blocks = blocks.clamp(max=0.2)
    blocks = blocks / torch.sqrt((blocks * blocks).sum(dim=3, keepdim=True) + eps ** 2)
    return blocks.flatten(1)


@dataclass
class Reference:
    """What the comparisons with a batch's original maps reuse: their ranks, [0, 1] maps, SSIM window moments
    and HOG features."""

    ranks: torch.Tensor
    ranks_abs: torch.Tensor
    maps01: torch.Tensor
    moments: torch.Tensor
    hog: torch.Tensor
    constant: torch.Tensor

    @classmethod
    def of(cls, maps: torch.Tensor) -> Reference:
        """``maps``: the original (B, 1, H, W) maps at the input size (:func:`input_maps`)."""
        flat = maps.flatten(1)
        both = signed_and_absolute_ranks(flat)
        maps01 = min_max(maps)
        return cls(both[:len(flat)], both[len(flat):], maps01, ssim_moments(maps01), hog_features(maps01),
                   constant(maps))


def signed_and_absolute_ranks(flat: torch.Tensor) -> torch.Tensor:
    """(2B, N): the ranks of the B maps, then of their absolute values, in one sort (which runs its rows in
    parallel: one image's two sorts share the cores); a batch without negative values ranks once."""
    if bool((flat >= 0).all()):
        once = ranks(flat)
        return torch.cat([once, once])
    return ranks(torch.cat([flat, flat.abs()]))


def compare(reference: Reference, maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """{similarity: (B,) float64 on the host} of the original maps (``reference``) and ``maps`` (the same images'
    maps at the input size); NaN where either map is constant."""
    flat = maps.flatten(1)
    maps01 = min_max(maps)
    both = signed_and_absolute_ranks(flat)
    scores = torch.stack([pearson(reference.ranks, both[:len(flat)]),
                          pearson(reference.ranks_abs, both[len(flat):]),
                          ssim(reference.maps01, maps01, moments_a=reference.moments),
                          pearson(reference.hog, hog_features(maps01))])
    undefined = reference.constant | constant(maps)
    scores = torch.where(undefined, torch.full_like(scores, float("nan")), scores).cpu()  # one copy to the host
    return dict(zip(FIELDS, scores.unbind(0), strict=True))
