"""Insertion and deletion games (Petsiuk et al. 2018, RISE protocol; UCAG paper Table 1), batched.

Pixels are ordered by descending saliency (ties keep raster order; ``ties="numpy"``: the official code's
order, see :func:`saliency_order`); every ``step`` pixels (all three
channels together) the image moves from ``start`` to ``finish``: deletion replaces pixels by zeros in
normalised space, insertion starts from a Gaussian blur (kernel 51, sigma 50) and copies the real pixels
in. The curve holds the softmax probability of the explained class after 0, step, 2*step, ... pixels,
ceil(HW/step) + 1 points; its AUC is the trapezoid on [0, 1] (reported x100 by the scripts).
All perturbed images are built on the device, each from the one before it (a copy plus the ``step`` pixels
that change), and scored in large no-grad forward batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.batching import batch_for_memory, even_chunks, run_chunks
from models.preprocessing import memory_format_of

BLUR_KERNEL, BLUR_SIGMA = 51, 50.0


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of curves sampled uniformly on [0, 1]: (sum - first/2 - last/2) / (len - 1)."""
    return (curves.sum(dim=-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (curves.shape[-1] - 1)


def insertion_substrate(images: torch.Tensor) -> torch.Tensor:
    """The blurred start of the insertion game (kernel 51, sigma 50, reflect border), normalised space:
    torchvision's ``gaussian_blur`` (the same 1-D kernel and padding), applied as the separable pair of 1-D
    convolutions it is, 25 x fewer operations than its 51 x 51 kernel (equal up to float rounding)."""
    kernel = min(BLUR_KERNEL, 2 * (min(images.shape[-2:]) // 2) - 1)  # reflect padding needs pad < side
    half = (kernel - 1) * 0.5
    taps = torch.linspace(-half, half, kernel, device=images.device, dtype=torch.float32)
    taps = torch.exp(-0.5 * (taps / BLUR_SIGMA).pow(2))
    taps = (taps / taps.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, [kernel // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1).expand(channels, 1, 1, kernel), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, -1, 1).expand(channels, 1, kernel, 1), groups=channels)


def deletion_substrate(images: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(images)


# How pixels of equal saliency are ordered: "raster" (the first in raster order goes first; the default, a
# property of the map alone) or "numpy" (the official code's np.flip(np.argsort(map)), --official).
TIE_ORDERS = ("raster", "numpy")


def check_ties(ties: str) -> str:
    if ties not in TIE_ORDERS:
        raise ValueError(f"ties must be one of {', '.join(TIE_ORDERS)}, got {ties!r}")
    return ties


def saliency_order(saliency: torch.Tensor, ties: str = "raster") -> torch.Tensor:
    """(B, H, W) maps -> (B, H*W) pixel indices in descending saliency.

    ties="raster": a stable descending sort, equal values in raster order. ties="numpy": the official
    insdel.py's ``np.flip(np.argsort(map.reshape(B, HW), axis=1), axis=-1)`` on the float32 maps, NumPy's
    default (unstable, introsort or SIMD) sort reversed: its tie order depends on the NumPy version and the
    CPU's SIMD extensions (x86-simd-sort on AVX-512/AVX2), which run.json records. Computed on the host
    (one copy of the maps per batch, as the official code), the indices go back to the maps' device."""
    flat = saliency.flatten(1)
    if check_ties(ties) == "raster":
        return torch.argsort(flat, dim=1, descending=True, stable=True)
    host = flat.detach().float().cpu().numpy()
    order = np.flip(np.argsort(host, axis=1), axis=-1)
    return torch.from_numpy(np.ascontiguousarray(order)).to(device=saliency.device, dtype=torch.int64)


def numpy_sort_identity() -> dict:
    """What the "numpy" tie order depends on: {'numpy': version} (identity) and the CPU's SIMD level
    NumPy dispatches its sort to (recorded beside it, not compared)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    simd = [name for name in ("AVX512_SKX", "AVX512F", "AVX2", "SSE4_2", "ASIMD", "VSX") if features.get(name)]
    return {"numpy": np.__version__, "about": {"numpy_simd": simd[0] if simd else "none"}}


def saliency_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(B, H, W) maps -> (B, H*W) rank of each pixel in descending order, ties in raster order."""
    order = saliency_order(saliency)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def num_points(pixels: int, step: int) -> int:
    """ceil(HW / step) + 1 curve points, both ends included."""
    return math.ceil(pixels / step) + 1


@torch.no_grad()
def game_curves(model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: torch.Tensor,
                mode: str, step: int, forward_batch: int | None = None,
                substrate: Callable[[torch.Tensor], torch.Tensor] | None = None, ties: str = "raster") -> torch.Tensor:
    """(B, ceil(HW/step)+1) probability curves of the insertion or deletion game.

    images: (B, 3, H, W) normalised; saliency: (B, H, W) or (B, 1, H, W) at the same size.
    forward_batch: perturbed images per forward (None: as many as half the free memory holds).
    ties: how equal saliencies are ordered, see :func:`saliency_order`.
    Each chunk's perturbed images are written into one reused buffer, in the model's memory format, by
    comparing one image's pixel ranks with the chunk's pixel counts (broadcast, no per-pair copies).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    batch, channels, height, width = images.shape
    saliency = saliency.reshape(batch, height, width)
    if mode == "deletion":
        start, finish = images, (substrate or deletion_substrate)(images)
    else:
        start, finish = (substrate or insertion_substrate)(images), images
    order = saliency_order(saliency, ties)
    points = num_points(height * width, step)
    total = batch * points
    counts = [min(point * step, height * width) for point in range(points)]  # pixels changed at each point
    pair_targets = targets.repeat_interleave(points)[:, None]
    forward_batch = forward_batch or even_chunks(total, batch_for_memory(model, (height, width), images.device,
                                                                         gradients=False))
    buffer = torch.empty(min(forward_batch, total), channels, height, width, device=images.device,
                         dtype=images.dtype, memory_format=memory_format_of(model))
    curves = torch.empty(total, device=images.device)

    def score(first: int, last: int) -> None:
        for image in range(first // points, (last - 1) // points + 1):  # the few images this chunk spans
            low, high = max(first, image * points), min(last, (image + 1) * points)
            _walk(start[image], finish[image], order[image], counts[low - image * points:high - image * points],
                  buffer[low - first:high - first])
        probabilities = torch.softmax(model(buffer[:last - first]).float(), dim=1)
        curves[first:last] = probabilities.gather(1, pair_targets[first:last])[:, 0]

    run_chunks(total, forward_batch, score, model, ("forward", (height, width), str(images.device)),
               "perturbed images")  # halves the chunk on out-of-memory
    return curves.view(batch, points)


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """A (H*W, C) view of a (C, H, W) tensor stored contiguous or channels-last (both merge H and W)."""
    return image.view(image.shape[0], -1).t()


def _walk(start: torch.Tensor, finish: torch.Tensor, order: torch.Tensor, counts: list[int],
          out: torch.Tensor) -> None:
    """out[j] = ``start`` with its first ``counts[j]`` pixels in ``order`` taken from ``finish`` (counts
    increasing): the first image in full, every next one as a copy of the one before plus its new pixels."""
    source, done = _pixels(finish), 0
    for j, count in enumerate(counts):
        out[j].copy_(start if j == 0 else out[j - 1])
        changed = order[(0 if j == 0 else done):count]
        if len(changed):
            _pixels(out[j])[changed] = source[changed]
        done = count
