"""Model-independent baselines for the localization games."""
from __future__ import annotations

import torch

from methods.base import Explainer, Explanation


class Center(Explainer):
    """The pointing game's center baseline.

    Pointing game: the point is TorchRay's exact image centre (u, v) = (w / 2, h / 2), i.e. (row, col) =
    (h / 2, w / 2) in 0-based pixel indices (:meth:`pointing_point`; a half-pixel position when a side is
    odd, which no map maximum can represent; ``evaluation.pointing.explainer_point`` uses it).
    Energy game and pictures: the map M = 1 - d / d_max, d the distance to that centre of the map's own
    frame, (H / 2, W / 2); for even sides its maximum is exactly that pixel, for odd sides the tie is
    broken towards the top-left pixel.
    """

    name = "center"

    @staticmethod
    def pointing_point(height: int, width: int) -> tuple[float, float]:
        """(row, col) = (height / 2, width / 2): TorchRay's center-baseline point for an image of that size."""
        return height / 2, width / 2

    @torch.no_grad()
    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        logits = self.model(x)  # the map ignores the targets; the template has range-checked them
        height, width = x.shape[-2:]
        row, col = self.pointing_point(height, width)
        rows = torch.arange(height, device=x.device, dtype=torch.float32) - row
        cols = torch.arange(width, device=x.device, dtype=torch.float32) - col
        distance = (rows[:, None] ** 2 + cols[None, :] ** 2).sqrt()
        saliency = 1 - distance / distance.max().clamp(min=1e-12)
        return Explanation(saliency.expand(x.shape[0], 1, height, width).clone(), logits)
