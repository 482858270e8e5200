"""CAM methods that run the network several times per image: Integrated Grad-CAM and CAMERAS.

Both follow the explainer contract of :mod:`methods.base`: raw signed maps (no ReLU, no min-max),
batched over images with per-sample targets, the model's logits for ``x`` itself.

* :class:`IntegratedGradCAM` (``igcam``; Sattarzadeh et al., ICASSP 2021) integrates Grad-CAM's
  gradient terms along the straight path from a baseline image x' to x.
* :class:`CAMERAS` (``cameras``; Jalwana et al., CVPR 2021) fuses the target layer's activations and
  gradients over several input resolutions.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from methods.base import Explainer, Explanation, resolve_targets
from methods.hooks import LayerCapture, restored_state

Post = Callable[[torch.Tensor], torch.Tensor] | None
Baseline = str | float

IGCAM_FORMULAS = ("integrated", "notebook")
DEFAULT_RESOLUTIONS = tuple(range(224, 1000, 100))  # 224, 324, ..., 924: the official default


def _positive_int(name: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


class IntegratedGradCAM(Explainer):
    """Integrated Grad-CAM (Sattarzadeh et al., ICASSP 2021): Grad-CAM integrated along a path.

    Path points ``x_k = x' + (k/m)(x - x')`` from a baseline image x' to x. With A(z) the target
    layer's activation for input z (after ``activation_post``), g(z) = dS_t/dA the gradient of the
    target logit S_t there, and Grad-CAM's weights w_c(z) = mean_ij g_c,ij(z):

    ``formula='integrated'`` (default)::

        M = (1/m) sum_{k=1..m} sum_c w_c(x_k) (A_c(x_k) - A_c(x'))

      a right Riemann sum (ending at x itself, as Integrated Gradients) of the path integral
      ``int_0^1 sum_c w_c(x_a) (A_c(x_a) - A_c(x')) da`` of Grad-CAM's terms taken relative to the
      baseline. Closed form for m = 1: ``sum_c w_c(x) (A_c(x) - A_c(x'))``. The error is O(1/m).

    ``formula='notebook'``: what the authors' public notebook computes (github.com/smstrzd/
    IntegratedGradCAM, ``Integrated_Grad_CAM.ipynb``, ``integrated_gradcam``)::

        M = (1/m) sum_{k=0..m-1} relu(sum_c w_c(x_k) A_c(x_k))

      TorchRay's Grad-CAM, with its ReLU, at the points k = 0..m-1 (baseline in, x out); the notebook
      sums instead of averaging, a constant factor m that min-max removes.

    Sources: the paper's method section could not be read here (only its abstract and introduction
    were reachable); the abstract says the *gradient-based terms* of Grad-CAM are path-integrated.
    The default keeps the notebook's per-point Grad-CAM terms and makes them baseline-relative, as
    the authors' later ``utils.py`` intends with ``(A - baseline) * mean(grad)`` at the layer (there
    the image-level baseline is passed in, and the file does not run as published); it drops the
    per-point ReLU (the contract returns raw maps) and uses the k = 1..m grid of Integrated Gradients.
    Not implemented: ``(A(x) - A(x')) * path-averaged w`` (Integrated Gradients applied to the weights
    only). For the usual last CAM layers (ResNet layer4, EfficientNet's head: global average pooling
    then one linear layer) g is the same at every input, so that form collapses to
    Grad-CAM(x) - Grad-CAM(x') whatever m, while the form above still integrates A along the path.

    baseline: ``'black'`` (default; the normalised image of a black picture, (0 - mean)/std per
    channel), ``'zeros'`` (a zero tensor in normalised space, i.e. the mean colour) or a float pixel
    value v of the unnormalised [0, 1] range, giving (v - mean)/std. steps: m. path_batch: path points
    (rows over all images, B*m in all) per forward/backward; None runs them all at once.
    """

    name = "igcam"

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post = None, *,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 steps: int = 50, baseline: Baseline = "black", path_batch: int | None = None,
                 formula: str = "integrated"):
        super().__init__(model)
        self.layer, self.activation_post = layer, activation_post
        self.steps = _positive_int("steps", steps)
        self.path_batch = _positive_int("path_batch", path_batch, allow_none=True)
        if formula not in IGCAM_FORMULAS:
            raise ValueError(f"formula must be one of {', '.join(IGCAM_FORMULAS)}, got {formula!r}")
        self.formula = formula
        if len(mean) != 3 or len(std) != 3 or any(float(s) == 0 for s in std):
            raise ValueError(f"mean and std need 3 values each (std non-zero), got {mean!r}, {std!r}")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if isinstance(baseline, str):
            if baseline not in ("black", "zeros"):
                raise ValueError(f"baseline must be 'black', 'zeros' or a pixel value, got {baseline!r}")
        elif isinstance(baseline, bool) or not isinstance(baseline, Real) or not math.isfinite(baseline):
            raise ValueError(f"baseline must be 'black', 'zeros' or a finite pixel value, got {baseline!r}")
        self.baseline = baseline

    def baseline_image(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised baseline x' as a (1, 3, 1, 1) per-channel constant on x's device."""
        if self.baseline == "zeros":
            return x.new_zeros(1, 3, 1, 1)
        pixel = 0.0 if self.baseline == "black" else float(self.baseline)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (pixel - mean) / std

    def path_alphas(self, x: torch.Tensor) -> torch.Tensor:
        """k/m per path step: k = m..1 (integrated: x itself first), k = 0..m-1 (notebook)."""
        m = self.steps
        k = torch.arange(m, 0, -1) if self.formula == "integrated" else torch.arange(0, m)
        return (k.to(torch.float64) / m).to(device=x.device, dtype=x.dtype)

    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        batch, size = x.shape[0], x.shape[-2:]
        integrated = self.formula == "integrated"
        base = self.baseline_image(x)
        alphas = self.path_alphas(x)
        rows = batch * self.steps                  # row r: step r // B (alpha = alphas[r // B]), image r % B
        chunk = rows if self.path_batch is None else self.path_batch
        logits_x, x_logits, map_sum, base_act = None, [], None, None
        with restored_state(self.model):
            if targets is None or not integrated:  # targets before the first backward / x is off the path
                with torch.no_grad():
                    logits_x = self.model(x)
                targets = resolve_targets(targets, logits_x)
            with torch.enable_grad(), LayerCapture(self.layer, self.activation_post) as capture:
                if integrated:
                    capture.forward(self.model, base.expand(1, -1, *size))
                    base_act = capture.activation.detach()
                for start in tqdm(range(0, rows, chunk), desc="igcam path", leave=False, disable=None):
                    index = torch.arange(start, min(start + chunk, rows), device=x.device)
                    image, step = index % batch, index // batch
                    points = torch.lerp(base.expand(len(index), -1, *size), x[image],
                                        alphas[step].view(-1, 1, 1, 1))  # weight 1 gives x exactly
                    logits = capture.forward(self.model, points)
                    if start == 0:
                        targets = resolve_targets(targets, logits)  # range check of given targets
                    score = logits.gather(1, targets[image][:, None]).sum()
                    (grads,) = torch.autograd.grad(score, capture.activation)
                    activation = capture.activation.detach()
                    if integrated:
                        activation = activation - base_act
                    cams = (grads.mean(dim=(2, 3))[:, :, None, None] * activation).sum(dim=1, keepdim=True)
                    if not integrated:
                        cams = cams.clamp(min=0)
                    if map_sum is None:
                        map_sum = cams.new_zeros(batch, *cams.shape[1:])
                    map_sum.index_add_(0, image, cams)
                    if integrated and start < batch:  # rows 0..B-1 are x itself (k = m)
                        x_logits.append(logits[:batch - start].detach())
        if logits_x is None:
            logits_x = torch.cat(x_logits)
        return Explanation(map_sum / self.steps, logits_x)

    def __repr__(self) -> str:
        return (f"IntegratedGradCAM(steps={self.steps}, baseline={self.baseline!r}, formula={self.formula!r}, "
                f"path_batch={self.path_batch})")


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

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post = None, *,
                 resolutions: Iterable[int] = DEFAULT_RESOLUTIONS, native_first: bool = True):
        super().__init__(model)
        self.layer, self.activation_post = layer, activation_post
        if isinstance(resolutions, (str, bytes)) or not isinstance(resolutions, Iterable):
            raise ValueError(f"resolutions must be an iterable of positive integers, got {resolutions!r}")
        resolutions = tuple(_positive_int("each resolution", r) for r in resolutions)
        if not resolutions:
            raise ValueError("resolutions must not be empty")
        if not isinstance(native_first, bool):
            raise ValueError(f"native_first must be True or False, got {native_first!r}")
        self.resolutions, self.native_first = resolutions, native_first

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

    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        batch, _, height, width = x.shape
        sizes = self.pass_sizes(height, width)
        filter_by_agreement = targets is None
        activations, gradients, agree = [], [], []
        with restored_state(self.model):
            logits_x = None
            if sizes[0] != (height, width):               # no pass runs on x itself: its logits first
                with torch.no_grad():
                    logits_x = self.model(x)
                targets = resolve_targets(targets, logits_x)
            with torch.enable_grad(), LayerCapture(self.layer, self.activation_post) as capture:
                for size in tqdm(sizes, desc="cameras resolutions", leave=False, disable=None):
                    inputs = x if size == (height, width) else F.interpolate(
                        x, size=size, mode="bicubic", align_corners=False)
                    logits = capture.forward(self.model, inputs)
                    if logits_x is None:                    # the first pass is x itself
                        logits_x = logits.detach()
                        targets = resolve_targets(targets, logits_x)
                    score = logits.gather(1, targets[:, None]).sum()
                    (grads,) = torch.autograd.grad(score, capture.activation)
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


def build_igcam(spec, **options) -> IntegratedGradCAM:
    """Integrated Grad-CAM at the spec's CAM layer; the 'black' baseline uses the spec's mean/std."""
    return IntegratedGradCAM(spec.model, spec.layer, spec.activation_post, mean=spec.mean, std=spec.std,
                             **options)


def build_cameras(spec, **options) -> CAMERAS:
    """CAMERAS at the spec's CAM layer; resolutions below the model's smallest input side are refused."""
    explainer = CAMERAS(spec.model, spec.layer, spec.activation_post, **options)
    too_small = [r for r in explainer.resolutions if r < spec.min_side]
    if too_small:
        raise ValueError(f"resolutions {too_small} are below {spec.name}'s smallest input side {spec.min_side}")
    return explainer
