"""ImageNet segmentation protocol (paper Table 4): threshold the map, pixel accuracy over the dataset,
mean over images of average precision. AP is computed as scikit-learn's ``average_precision_score``
(step-wise, ties grouped), without scikit-learn."""
from __future__ import annotations

import torch


def threshold_maps(maps: torch.Tensor, signed: bool) -> torch.Tensor:
    """Foreground masks: map > 0 for signed relevance maps, map > its mean for non-negative maps."""
    if signed:
        return maps > 0
    return maps > maps.flatten(1).mean(dim=1).view(-1, *([1] * (maps.dim() - 1)))


def pixel_counts(foreground: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, labelled) pixels per image; labels < 0 are ignored."""
    labelled = truth >= 0
    correct = (foreground == (truth > 0)) & labelled
    return correct.flatten(1).sum(1), labelled.flatten(1).sum(1)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (NaN without positives)."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    true_positives = torch.cumsum(labels.double(), 0)
    last_of_tie = torch.ones_like(labels)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    true_positives = true_positives[last_of_tie]
    ranks = torch.nonzero(last_of_tie).flatten().double() + 1
    precision, recall = true_positives / ranks, true_positives / positives
    previous = torch.cat([torch.zeros(1, dtype=recall.dtype, device=recall.device), recall[:-1]])
    return float(((recall - previous) * precision).sum())


def image_scores(maps: torch.Tensor, truth: torch.Tensor, signed: bool, protocol: str = "map"):
    """Per-image (correct, labelled, AP) of (B, H, W) maps against (B, H, W) masks; counts as CPU tensors.

    protocol 'map': AP of the map's values against the mask (the definition in the issue and README).
    protocol 'agf': AP of the thresholded two-channel output [background, foreground] against the one-hot
    mask, as the evaluation script used by AGF and the UCAG authors computes it.
    """
    foreground = threshold_maps(maps, signed)
    correct, labelled = pixel_counts(foreground, truth)
    # one host copy per batch: each image's AP reads data-dependent sizes (masked pixels, positives, ties),
    # which on an accelerator would wait for the device once per read; counts come back on the CPU too
    maps, truth, foreground, correct, labelled = (t.cpu() for t in (maps, truth, foreground, correct, labelled))
    aps = []
    for i in range(maps.shape[0]):
        valid = truth[i] >= 0
        target = truth[i][valid] > 0
        if protocol == "agf":
            binary = foreground[i][valid].double()
            aps.append(average_precision(torch.cat([1 - binary, binary]), torch.cat([~target, target])))
        else:
            aps.append(average_precision(maps[i][valid], target))
    return correct, labelled, aps
