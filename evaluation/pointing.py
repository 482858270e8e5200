"""Pointing game (Zhang et al. 2016, TorchRay protocol; Table 2) and energy-based pointing game
(Score-CAM; Table 3) on maps at the image's original size."""
from __future__ import annotations

import numpy as np
import torch

TOLERANCE = 15


def map_point(saliency: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the maximum of an (H, W) map (first one in raster order on ties)."""
    index = int(torch.argmax(saliency))
    return divmod(index, saliency.shape[-1])


def pointing_hit(mask: np.ndarray | torch.Tensor, point: tuple[float, float], tolerance: float = TOLERANCE) -> bool:
    """Hit when a ground-truth pixel lies at distance < tolerance from ``point`` = (row, col)."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    row, col = point
    top, left = max(0, int(np.floor(row - tolerance))), max(0, int(np.floor(col - tolerance)))
    window = mask[top:int(np.ceil(row + tolerance)) + 1, left:int(np.ceil(col + tolerance)) + 1]
    if not bool(window.any()):
        return False
    rows = torch.arange(window.shape[0], dtype=torch.float64)[:, None] + top - row
    cols = torch.arange(window.shape[1], dtype=torch.float64)[None, :] + left - col
    return bool((window & (rows ** 2 + cols ** 2 < tolerance ** 2)).any())


def energy_score(saliency: torch.Tensor, boxes: np.ndarray | torch.Tensor) -> float:
    """Share of a non-negative map's mass inside the boxes: sum(M * B) / sum(M) (0 for an empty map)."""
    saliency = saliency.clamp(min=0).double()
    total = float(saliency.sum())
    if total <= 0:
        return 0.0
    inside = torch.as_tensor(boxes, dtype=torch.bool, device=saliency.device)
    return float(saliency[inside].sum()) / total


def class_mean(values_by_class: dict[int, list[float]]) -> float:
    """Mean over classes of each class's mean (classes without any pair are left out); NaN if none."""
    means = [float(np.mean(v)) for v in values_by_class.values() if v]
    return float(np.mean(means)) if means else float("nan")


def pooled_mean(values_by_class: dict[int, list[float]]) -> float:
    """Mean over all pairs regardless of class (not the paper's number; for comparison)."""
    values = [x for v in values_by_class.values() for x in v]
    return float(np.mean(values)) if values else float("nan")
