"""Integrated Grad-CAM (``igcam``; Sattarzadeh et al., ICASSP 2021): Grad-CAM's gradient terms integrated
along the straight path from a baseline image x' to x.

Follows the explainer contract of :mod:`methods.base`: raw signed maps (no ReLU, no min-max), batched over
images with per-sample targets, the model's logits for ``x`` itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from methods.base import Explainer, Explanation
from methods.errors import MethodError
from methods.hooks import LayerCapture, Post
from methods.options import Option, choice, in_interval, positive_int
from methods.targets import target_gradients
from models.spec import ModelSpec

Baseline = str | float

IGCAM_FORMULAS = ("integrated", "notebook")
BASELINES = ("black", "zeros")


def check_baseline(name: str, value) -> Baseline:
    """'black', 'zeros' or a pixel value in [0, 1]."""
    return choice(name, value, BASELINES) if isinstance(value, str) else in_interval(name, value, 0.0, 1.0)


def baseline_from_text(text: str) -> Baseline:
    """--baseline's text: black, zeros or a number."""
    if text in BASELINES:
        return text
    try:
        return float(text)
    except ValueError:
        raise MethodError(f"{BASELINE.flag} must be black, zeros or a pixel value in [0, 1], got '{text}'") from None


STEPS = Option("steps", "--steps", 50, positive_int, "path points m", type=int)
BASELINE = Option("baseline", "--baseline", "black", check_baseline,
                  "path start x': black, zeros, or a pixel value in [0, 1]", parse=baseline_from_text)
# an image's 50 points stay in one batch; UCAG's 64 crops x 50 points would not fit at once
PATH_BATCH = Option("path_batch", "--path-batch", 256, partial(positive_int, optional=True),
                    "path points per forward/backward, over all images", type=int)
FORMULA = Option("formula", "--igcam-formula", "integrated", partial(choice, choices=IGCAM_FORMULAS),
                 "the path sum M: integrated (Riemann sum of baseline-relative Grad-CAM terms, k = 1..m) or "
                 "notebook (the authors' notebook: mean of relu(Grad-CAM) at k = 0..m-1)")
IGCAM_OPTIONS = (STEPS, BASELINE, PATH_BATCH, FORMULA)


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

    mean, std: the model's input normalisation (the builder takes them from the ModelSpec).
    baseline: ``'black'`` (default; the normalised image of a black picture, (0 - mean)/std per
    channel), ``'zeros'`` (a zero tensor in normalised space, i.e. the mean colour) or a float pixel
    value v of the unnormalised [0, 1] range, giving (v - mean)/std. steps: m. path_batch: path points
    (rows over all images, B*m in all) per forward/backward (default 256); None runs them all at once.
    """

    name = "igcam"

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post | None = None, *,
                 mean: Sequence[float], std: Sequence[float], steps: int = STEPS.default,
                 baseline: Baseline = BASELINE.default, path_batch: int | None = PATH_BATCH.default,
                 formula: str = FORMULA.default):
        super().__init__(model)
        self.layer, self.activation_post = layer, activation_post
        self.steps = STEPS.validate(steps)
        self.path_batch = PATH_BATCH.validate(path_batch)
        self.formula = FORMULA.validate(formula)
        if len(mean) != 3 or len(std) != 3 or any(float(s) == 0 for s in std):
            raise MethodError(f"mean and std must be 3 values each (std non-zero), got {mean!r}, {std!r}")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.baseline = BASELINE.validate(baseline)  # README: black, zeros or a pixel value in [0, 1]
        self._path_cache: dict = {}

    def baseline_image(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised baseline x' as a (1, 3, 1, 1) per-channel constant on x's device."""
        if self.baseline == "zeros":
            return x.new_zeros(1, 3, 1, 1)
        pixel = 0.0 if self.baseline == "black" else float(self.baseline)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (pixel - mean) / std

    def path_alphas(self, x: torch.Tensor) -> torch.Tensor:
        """k/m per path step: k = m..1 (integrated: x itself first), k = 0..m-1 (notebook); computed in
        float64 on the CPU (not every device has float64), then moved to x's device and dtype."""
        m = self.steps
        k = torch.arange(m, 0, -1, device="cpu") if self.formula == "integrated" else torch.arange(0, m, device="cpu")
        return (k.to(torch.float64) / m).to(device=x.device, dtype=x.dtype)

    def path_constants(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`baseline_image`, :meth:`path_alphas`), made once per device and dtype: each is a copy from
        the host, which waits for the device, and UCAG calls the explainer once per chunk of crops."""
        key = (x.device, x.dtype, self.baseline, self.steps, self.formula, self.mean, self.std)
        if key not in self._path_cache:
            self._path_cache[key] = self.baseline_image(x), self.path_alphas(x)
        return self._path_cache[key]

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        return self.integrate(x, targets, None)

    def explain_prediction(self, x: torch.Tensor, logits: torch.Tensor) -> Explanation:
        """No target given: x's predicted classes, and ``logits`` (x's, no graph) returned as they are."""
        return self.integrate(x, logits.argmax(dim=1), logits)

    def integrate(self, x: torch.Tensor, targets: torch.Tensor, logits_x: torch.Tensor | None) -> Explanation:
        """The map M for (B,) ``targets``; ``logits_x``: x's logits when known (else from the path rows at x,
        or from a no-grad forward of x for the notebook formula, whose path does not reach x)."""
        batch, size = x.shape[0], x.shape[-2:]
        integrated = self.formula == "integrated"
        base, alphas = self.path_constants(x)
        rows = batch * self.steps                  # row r: step r // B (alpha = alphas[r // B]), image r % B
        chunk = rows if self.path_batch is None else self.path_batch
        x_logits, map_sum, base_act = [], None, None
        if logits_x is None and not integrated:  # x is off the notebook's path
            with torch.no_grad():
                logits_x = self.model(x)
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
                (grads,) = target_gradients(logits, targets[image], capture.activation)
                if integrated and start == 0:  # rows 0..B-1: x itself
                    self.check_gradients(grads[:batch], self.layer)
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


def build_igcam(spec: ModelSpec, **options) -> IntegratedGradCAM:
    """Integrated Grad-CAM at the spec's CAM layer; the 'black' baseline uses the spec's mean/std."""
    return IntegratedGradCAM(spec.model, spec.layer, spec.activation_post, mean=spec.mean, std=spec.std,
                             **options)
