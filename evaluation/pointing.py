"""Pointing game (Zhang et al. 2016, TorchRay protocol; Table 2) and energy-based pointing game
(Score-CAM; Table 3) on maps at the image's original size.

The reference protocol is TorchRay 1.0.0.2's benchmark (``torchray.benchmark.pointing_game`` and its
``examples/attribution_benchmark.py``), and every default here follows it:

- maps are resized to the original image with plain bilinear interpolation (``align_corners=False``, no
  anti-aliasing): the explainer's ``finalize(raw, (height, width), antialias=False)``;
- the point is the first maximum of the map in raster order (:func:`map_point`), except for the
  ``center`` baseline, whose point is TorchRay's exact (w / 2, h / 2) (:func:`explainer_point`);
- a hit is a ground-truth pixel at distance < ``tolerance`` from the point (:func:`pointing_hit`);
- the accuracy is the mean over *all* classes of hits / (hits + misses), a class without any evaluated
  pair counting as 0 (:func:`pointing_accuracy`, ``aggregation="torchray"``);
- with a difficult list, an image missing from the list has all its pairs in the difficult subset
  (:func:`in_difficult_subset`, ``unlisted="difficult"``).

Points are (row, col) here; TorchRay writes them (u, v) = (col, row).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

TOLERANCE = 15
AGGREGATIONS = ("torchray", "evaluated-classes")
UNLISTED = ("difficult", "all-only")


def map_point(saliency: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the maximum of an (H, W) map (first one in raster order on ties, as TorchRay)."""
    index = int(torch.argmax(saliency))
    return divmod(index, saliency.shape[-1])


def explainer_point(explainer: object, saliency: torch.Tensor) -> tuple[float, float]:
    """The point an explainer's (H, W) map at the image's size scores in the pointing game.

    Explainers with a fixed point (``pointing_point(height, width)``, e.g. the ``center`` baseline:
    TorchRay's exact image centre, a half-pixel position for odd sides) give it; any other explainer
    points at its map's maximum (:func:`map_point`).
    """
    fixed = getattr(explainer, "pointing_point", None)
    if fixed is not None:
        return fixed(*saliency.shape[-2:])
    return map_point(saliency)


def pointing_hit(mask: np.ndarray | torch.Tensor, point: tuple[float, float], tolerance: float = TOLERANCE) -> bool:
    """Hit when a ground-truth pixel lies at distance < tolerance from ``point`` = (row, col).

    Pixel (i, j) sits at (i, j); squared distances are computed in float32 like TorchRay's
    ``PointingGame.evaluate``, so that results agree bit for bit at the boundary as well.
    """
    device = mask.device if isinstance(mask, torch.Tensor) else torch.device("cpu")
    mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
    row, col = (torch.tensor(float(v), dtype=torch.float32, device="cpu") for v in point)
    top = max(0, int(np.floor(float(row) - tolerance)) - 1)
    left = max(0, int(np.floor(float(col) - tolerance)) - 1)
    window = mask[top:int(np.ceil(float(row) + tolerance)) + 2, left:int(np.ceil(float(col) + tolerance)) + 2]
    if not bool(window.any()):
        return False
    rows = (torch.arange(top, top + window.shape[0], dtype=torch.float32, device="cpu") - row).to(device) ** 2
    cols = (torch.arange(left, left + window.shape[1], dtype=torch.float32, device="cpu") - col).to(device) ** 2
    return bool((window & (rows[:, None] + cols[None, :] < tolerance ** 2)).any())


def energy_score(saliency: torch.Tensor, boxes: np.ndarray | torch.Tensor) -> float:
    """Share of a non-negative map's mass inside the boxes: sum(M * B) / sum(M) (0 for an empty map)."""
    saliency = saliency.clamp(min=0).double()
    total = float(saliency.sum())
    if total <= 0:
        return 0.0
    inside = torch.as_tensor(boxes, dtype=torch.bool, device=saliency.device)
    return float(saliency[inside].sum()) / total


def class_mean(values_by_class: Mapping[int, Sequence[float]]) -> float:
    """Mean over classes of each class's mean (classes without any pair are left out); NaN if none."""
    means = [float(np.mean(v)) for v in values_by_class.values() if len(v)]
    return float(np.mean(means)) if means else float("nan")


def class_accuracies(hits_by_class: Mapping[int, Sequence[float]], num_classes: int) -> np.ndarray:
    """(num_classes,) float64 hits / max(1, pairs) per class, 0 for a class without pairs (TorchRay's
    ``PointingGame.class_accuracies``). ``hits_by_class``: class index -> one 1/0 (or True/False) per pair."""
    hits, pairs = np.zeros(num_classes), np.zeros(num_classes)
    for label, values in hits_by_class.items():
        if not 0 <= label < num_classes:
            raise ValueError(f"class {label} is outside 0..{num_classes - 1}")
        hits[label] += float(np.sum(np.asarray(values, dtype=np.float64)))
        pairs[label] += len(values)
    return hits / np.maximum(pairs, 1)


def pointing_accuracy(hits_by_class: Mapping[int, Sequence[float]], num_classes: int,
                      aggregation: str = "torchray") -> float:
    """Pointing-game accuracy in [0, 1] from per-class hits (class index -> one 1/0 per evaluated pair).

    ``aggregation="torchray"`` (the reference): mean of :func:`class_accuracies` over all ``num_classes``
    classes, a class without any evaluated pair counting as 0 (it matters on subsets such as the difficult
    one); ``"evaluated-classes"``: mean over the classes with at least one pair only (NaN if none).
    """
    if aggregation == "torchray":
        return float(class_accuracies(hits_by_class, num_classes).mean())
    if aggregation == "evaluated-classes":
        class_accuracies(hits_by_class, num_classes)  # same range check
        return class_mean(hits_by_class)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, not '{aggregation}'")


def in_difficult_subset(flags: Mapping[str, Sequence[bool]] | None, key: str, label: int,
                        unlisted: str = "difficult") -> bool:
    """Whether the (image ``key``, class ``label``) pair belongs to the difficult subset.

    ``flags``: image id -> one flag per class (``evaluation.localization_data.read_difficult_list``), or
    None when no list is given (no difficult subset: False). A listed image counts when its class flag
    is set. An image missing from the list: ``unlisted="difficult"`` (TorchRay: only listed easy pairs are
    skipped, so all its pairs count in the subset) or ``"all-only"`` (none of them count).
    """
    if unlisted not in UNLISTED:
        raise ValueError(f"unlisted must be one of {', '.join(UNLISTED)}, not '{unlisted}'")
    if flags is None:
        return False
    if key in flags:
        return bool(flags[key][label])
    return unlisted == "difficult"
