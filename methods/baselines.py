"""Model-independent baselines for the localization games."""
from __future__ import annotations

import torch

from methods.base import Explainer, Explanation, resolve_targets


class Center(Explainer):
    """The pointing game's center baseline: M = 1 - d / d_max, d the distance to the image centre.

    Its maximum is the centre pixel (for even sides, the first of the central ones in raster order).
    """

    name = "center"

    @torch.no_grad()
    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        logits = self.model(x)
        resolve_targets(targets, logits)
        height, width = x.shape[-2:]
        rows = torch.arange(height, device=x.device, dtype=torch.float32) - (height - 1) // 2
        cols = torch.arange(width, device=x.device, dtype=torch.float32) - (width - 1) // 2
        distance = (rows[:, None] ** 2 + cols[None, :] ** 2).sqrt()
        saliency = 1 - distance / distance.max().clamp(min=1e-12)
        return Explanation(saliency.expand(x.shape[0], 1, height, width).clone(), logits)
