"""CAMERAS (``cameras``; Jalwana et al., CVPR 2021): the target layer's activations and gradients fused over
several input resolutions.

Follows the explainer contract of :mod:`methods.base`: raw signed maps (no ReLU, no min-max), batched over
images with per-sample targets, the model's logits for ``x`` itself.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from methods.base import Explainer, Explanation
from methods.errors import MethodError
from methods.hooks import LayerCapture, Post
from methods.options import Option, boolean_from_text, flag, positive_ints
from methods.targets import target_gradients
from models.spec import ModelSpec

DEFAULT_RESOLUTIONS = tuple(range(224, 1000, 100))  # 224, 324, ..., 924: the official default
RESOLUTIONS = Option("resolutions", "--resolutions", DEFAULT_RESOLUTIONS, positive_ints, "input sides fused",
                     type=int, nargs="+", shown="224 324 ... 924")
NATIVE_FIRST = Option("native_first", "--native-first", True, flag,
                      "the first pass on x unresized, as the official code (true, false)",
                      parse=boolean_from_text, shown="true")
CAMERAS_OPTIONS = (RESOLUTIONS, NATIVE_FIRST)


class CAMERAS(Explainer):
    """CAMERAS (Jalwana et al., CVPR 2021): activations and gradients fused over input resolutions.

    For each resolution r the batch is resized (bicubic, as the official code) to r x r, or, for a
    non-square input, so that its shorter side is r with the aspect kept (the official code always
    uses r x r; both agree on square inputs). One forward and one backward of the target logit give
    the target layer's activation A_r and gradient G_r = dS_t/dA_r; both are upsampled bilinearly to
    x's H x W and averaged over the resolutions, then::

        M = sum_c mean_r(up(A_r))_c * mean_r(up(G_r))_c            (B, 1, H, W), raw and signed

    (the official code then applies a ReLU and min-max: the callers' post-processing here).

    Settled by the official code (github.com/VisMIL/CAMERAS ``CAMERAS.py``, identical in the UCAG
    authors' copy ``cam/cameras.py``): default resolutions 224, 324, ..., 924; with ``native_first``
    (default) the first pass runs on x as it is, unresized, exactly as the official code treats
    ``resolutions[0]`` (it assumes x already has that size); bicubic image resizing; bilinear feature
    upsampling; the product of the two means summed over channels. When ``targets`` is None the
    official code keeps only the resolutions whose own top-1 class agrees with the first pass's;
    here: with x's predicted class (a sample where none agrees falls back to all resolutions). With
    explicit targets every resolution is fused, as there. One difference: the official code fuses at
    resolutions[0] x resolutions[0] and resizes the map afterwards; this fuses at x's own size.

    The fusion runs in channel chunks of at most ``fusion_elements`` values per tensor, so memory
    stays bounded for deep layers (C = 2048) and large batches.
    """

    name = "cameras"
    fusion_elements = 1 << 24

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post | None = None, *,
                 resolutions: Iterable[int] = RESOLUTIONS.default, native_first: bool = NATIVE_FIRST.default):
        super().__init__(model)
        self.layer, self.activation_post = layer, activation_post
        self.resolutions = RESOLUTIONS.validate(resolutions)
        self.native_first = NATIVE_FIRST.validate(native_first)

    @staticmethod
    def pass_size(height: int, width: int, resolution: int) -> tuple[int, int]:
        """(r, r) for a square input; otherwise the shorter side becomes r, the aspect kept."""
        if height == width:
            return resolution, resolution
        scale = resolution / min(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def pass_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        sizes = [self.pass_size(height, width, r) for r in self.resolutions]
        if self.native_first:
            sizes[0] = (height, width)
        return sizes

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        return self.fused(x, targets, filter_by_agreement=False)

    def explain_prediction(self, x: torch.Tensor, logits: torch.Tensor) -> Explanation:
        """No target given: only the resolutions whose top-1 class agrees with x's prediction are fused."""
        return self.fused(x, logits.argmax(dim=1), filter_by_agreement=True)

    def fused(self, x: torch.Tensor, targets: torch.Tensor, filter_by_agreement: bool) -> Explanation:
        """The map M for (B,) ``targets``, each resolution weighted by its top-1 agreeing with ``targets``
        when ``filter_by_agreement`` (the official code's rule without given targets), else all equally."""
        batch, _, height, width = x.shape
        sizes = self.pass_sizes(height, width)
        activations, gradients, agree = [], [], []
        logits_x = None
        if sizes[0] != (height, width):               # no pass runs on x itself: its logits first
            with torch.no_grad():
                logits_x = self.model(x)
        with torch.enable_grad(), LayerCapture(self.layer, self.activation_post) as capture:
            for size in tqdm(sizes, desc="cameras resolutions", leave=False, disable=None):
                inputs = x if size == (height, width) else F.interpolate(
                    x, size=size, mode="bicubic", align_corners=False)
                logits = capture.forward(self.model, inputs)
                if logits_x is None:                    # the first pass is x itself
                    logits_x = logits.detach()
                (grads,) = target_gradients(logits, targets, capture.activation)
                self.check_gradients(grads, self.layer)  # the first pass only (see Explainer.check_gradients)
                activations.append(capture.activation.detach())
                gradients.append(grads)
                agree.append(logits.detach().argmax(dim=1) == targets)
        if filter_by_agreement:
            weights = torch.stack(agree).to(x.dtype)                       # (R, B)
            none = weights.sum(dim=0) == 0
            weights = torch.where(none[None], torch.ones_like(weights), weights)
        else:
            weights = torch.ones(len(sizes), batch, device=x.device, dtype=x.dtype)
        return Explanation(self.fuse(activations, gradients, weights, (height, width)), logits_x)

    def fuse(self, activations: list, gradients: list, weights: torch.Tensor,
             size: tuple[int, int]) -> torch.Tensor:
        """sum_c (weighted mean of upsampled A)_c * (weighted mean of upsampled G)_c -> (B, 1, H, W)."""
        batch, channels = activations[0].shape[:2]
        counts = weights.sum(dim=0).view(batch, 1, 1, 1)
        step = max(1, self.fusion_elements // (batch * size[0] * size[1]))
        saliency = activations[0].new_zeros(batch, 1, *size)

        def upsample(t: torch.Tensor) -> torch.Tensor:
            if tuple(t.shape[-2:]) == tuple(size):
                return t
            return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

        for start in range(0, channels, step):
            mean_a = mean_g = 0
            for w, a, g in zip(weights, activations, gradients, strict=True):
                w = w.view(batch, 1, 1, 1)
                mean_a = mean_a + w * upsample(a[:, start:start + step])
                mean_g = mean_g + w * upsample(g[:, start:start + step])
            saliency += (mean_a * mean_g).sum(dim=1, keepdim=True)
        return saliency / counts.pow(2)

    def __repr__(self) -> str:
        return f"CAMERAS(resolutions={list(self.resolutions)}, native_first={self.native_first})"


def build_cameras(spec: ModelSpec, **options) -> CAMERAS:
    """CAMERAS at the spec's CAM layer; resolutions below the model's smallest input side are refused."""
    explainer = CAMERAS(spec.model, spec.layer, spec.activation_post, **options)
    too_small = [r for r in explainer.resolutions if r < spec.min_side]
    if too_small:
        raise MethodError(f"resolutions {too_small} are below {spec.name}'s smallest input side {spec.min_side}")
    return explainer
