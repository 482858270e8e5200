"""Average drop and increase in confidence (Chattopadhay et al., WACV 2018, the Grad-CAM++ paper).

The image X (normalised, as the model takes it) is masked by its explanation map M in [0, 1] at the input
size, E = M * X (a removed pixel becomes 0 in normalised space, the dataset's mean colour: the substrate of
density.py and of both peers, pytorch-grad-cam's ``DropInConfidence`` and torchcam's ``ClassificationMetric``).
With Y = P_c(X) and O = P_c(E) the explained class's probability (softmax; sigmoid for multi-label models):

    drop = max(0, Y - O) / Y          (Average Drop %: 100 x its mean over images)
    increase = 1[O > Y]               (Increase in Confidence %: 100 x its mean)
    change = O - Y                    (the mean change of the class's probability)

pytorch-grad-cam's ``DropInConfidence`` returns max(0, Y - O) unnormalised (the paper and torchcam divide by
Y); its ``IncreaseInConfidence`` is the same indicator.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.targets import target_probabilities


@torch.no_grad()
def confidence_change(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                      multilabel: bool = False) -> dict[str, torch.Tensor]:
    """(B,) drop, increase and change for (B, 3, H, W) images and their (B, 1, H, W) [0, 1] maps; one
    forward of the images and their masked copies together."""
    batch = images.shape[0]
    maps = maps.reshape(batch, 1, *images.shape[-2:]).to(images.dtype)
    logits = model(torch.cat([images, maps * images]))
    probabilities = target_probabilities(logits, torch.cat([targets, targets]), multilabel)
    original, masked = probabilities[:batch], probabilities[batch:]
    return {"drop": (original - masked).clamp(min=0) / original.clamp(min=torch.finfo(original.dtype).tiny),
            "increase": (masked > original).float(), "change": masked - original}
