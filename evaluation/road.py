"""ROAD: RemOve And Debias (Rong et al., ICML 2022), most-relevant-first (MoRF) and least-relevant-first (LeRF).

For each percentile p (default 10, 20, ..., 90) the floor(p/100 * H*W) most relevant pixels (MoRF) or least
relevant pixels (LeRF) of the [0, 1] map, all channels together, are removed and filled by noisy linear
imputation (:mod:`evaluation.imputation`), and the imputed image is scored: the explained class's softmax
probability and whether it is still the predicted class. Equal map values are removed in raster order (a
stable sort). A good map makes the MoRF curve fall fast (low mean) and the LeRF curve stay high.

Per image: ``morf`` / ``lerf`` = the curve's mean over the percentiles (its area for evenly spaced
percentiles; pytorch-grad-cam's ``ROAD*Average`` minus the unperturbed score), ``combined`` =
(lerf - morf) / 2 (pytorch-grad-cam's ``ROADCombined``), ``morf_accuracy`` / ``lerf_accuracy`` = the mean of
the still-predicted indicator (Quantus's ``ROAD`` score per percentile, MoRF only there), ``original`` = the
unperturbed probability, and the four curves. The imputation noise of an image comes from a generator seeded
by ``seed`` and the image's key: the same numbers in any batch, on any device, after any resume.
"""
from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from evaluation.imputation import check_removed, fill_in, linear_fill
from methods.batching import batch_for_memory, even_chunks, run_chunks
from methods.targets import target_probabilities

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
DEFAULT_NOISE = 0.01  # the ROAD authors' noise (absolute, normalised space)
ORDERS = ("morf", "lerf")


def removed_count(pixels: int, percentile: float) -> int:
    """floor(p/100 * pixels): the pixels removed at percentile p (Quantus's count)."""
    return math.floor(pixels * percentile / 100)


def removal_orders(maps: torch.Tensor) -> dict[str, np.ndarray]:
    """(B, H*W) pixel indices per order: descending relevance for MoRF, ascending for LeRF (ties in raster
    order both ways)."""
    flat = maps.reshape(maps.shape[0], -1).float()
    return {"morf": torch.argsort(flat, dim=1, descending=True, stable=True).cpu().numpy(),
            "lerf": torch.argsort(flat, dim=1, descending=False, stable=True).cpu().numpy()}


def image_seed(seed: int, key: str) -> list[int]:
    """The noise generator's seed of one image: the run's seed and a stable hash of the image's key."""
    return [seed, zlib.crc32(key.encode("utf-8"))]


def solver_threads() -> int:
    """Threads that solve imputation systems at once: the CPU cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def imputed_images(images: torch.Tensor, maps: torch.Tensor, percentiles: Sequence[float], noise: float,
                   seeds: Sequence[Sequence[int]]) -> np.ndarray:
    """(B, 2, K, C, H, W) float32: each image with its MoRF then LeRF pixels removed at each percentile, imputed
    on the host in float64 (one sparse solve per image, order and percentile, on :func:`solver_threads`
    threads); the noise is drawn afterwards in that fixed order, from each image's own generator."""
    batch, channels, height, width = images.shape
    pixels = images.detach().double().cpu().numpy()
    orders = removal_orders(maps)
    counts = [removed_count(height * width, p) for p in percentiles]
    jobs = [(image, o, k, np.sort(orders[order][image, :count]))
            for image in range(batch) for o, order in enumerate(ORDERS) for k, count in enumerate(counts)]
    for job in jobs:
        check_removed(pixels.shape[1:], job[3])
    with ThreadPoolExecutor(solver_threads()) as pool:
        values = list(pool.map(lambda job: linear_fill(pixels[job[0]], job[3]), jobs))
    out = np.empty((batch, len(ORDERS), len(percentiles), channels, height, width), dtype=np.float32)
    generators = [np.random.default_rng(seed) for seed in seeds]
    for (image, o, k, removed), filled in zip(jobs, values, strict=True):
        out[image, o, k] = fill_in(pixels[image], removed, filled, noise, generators[image])
    return out


class RoadMetric:
    """The ROAD metric as :class:`evaluation.image_metric.ImageMetricTask` calls it (with the batch's keys).

    percentiles: p in (0, 100); noise: the imputation's noise (sigma); seed: the noise's seed;
    score_batch: imputed images per no-grad forward (None: from free memory)."""

    needs_keys = True

    def __init__(self, percentiles: Sequence[float] = DEFAULT_PERCENTILES, noise: float = DEFAULT_NOISE,
                 seed: int = 0, score_batch: int | None = None):
        self.percentiles, self.noise, self.seed, self.score_batch = tuple(percentiles), noise, seed, score_batch

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                 keys: Sequence[str]) -> dict[str, torch.Tensor]:
        batch, _, height, width = images.shape
        points = len(self.percentiles)
        imputed = imputed_images(images, maps, self.percentiles, self.noise,
                                 [image_seed(self.seed, key) for key in keys])
        imputed = torch.from_numpy(imputed).view(-1, *images.shape[1:])
        total = imputed.shape[0]
        pair_targets = targets.repeat_interleave(len(ORDERS) * points)
        probabilities = torch.empty(total, device=images.device)
        correct = torch.empty(total, device=images.device)
        chunk = self.score_batch or even_chunks(total, batch_for_memory(model, (height, width), images.device,
                                                                        gradients=False))

        def score(first: int, last: int) -> None:
            logits = model(imputed[first:last].to(images.device, images.dtype, non_blocking=True))
            probabilities[first:last] = target_probabilities(logits, pair_targets[first:last])
            correct[first:last] = (logits.argmax(dim=1) == pair_targets[first:last]).float()

        run_chunks(total, chunk, score, model, ("forward", (height, width), str(images.device)), "imputed images")
        original = target_probabilities(model(images), targets)
        curves = probabilities.view(batch, len(ORDERS), points)
        hits = correct.view(batch, len(ORDERS), points)
        morf, lerf = curves[:, 0].mean(dim=1), curves[:, 1].mean(dim=1)
        return {"morf": morf, "lerf": lerf, "combined": (lerf - morf) / 2,
                "morf_accuracy": hits[:, 0].mean(dim=1), "lerf_accuracy": hits[:, 1].mean(dim=1),
                "original": original, "morf_curve": curves[:, 0], "lerf_curve": curves[:, 1],
                "morf_correct": hits[:, 0], "lerf_correct": hits[:, 1]}
