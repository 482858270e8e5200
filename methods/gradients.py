"""Gradient-based methods: FullGrad and the pointing-game baselines gradient, guided backprop, DeconvNet.

FullGrad (Srinivas & Fleuret, NeurIPS 2019) decomposes the target logit of a piecewise-linear network as

    f(x) = <grad_x f, x> + sum_l <grad_{b_l} f, b_l>

over every bias-carrying layer l (``nn.Conv2d`` / ``nn.Linear`` with a bias, ``nn.BatchNorm2d`` with its
eval-mode effective bias beta - gamma * mean / sqrt(var + eps)). The bias term at each output position is
the gradient at the layer's output times the bias of its channel. The saliency map follows the authors'
code (github.com/idiap/fullgrad-saliency, ``saliency/fullgrad.py``): each term is post-processed by
``|.|``, then a per-image min-max over all its channels and positions (``(t - min) / (max + 1e-6)``); the
input term ``grad_x * x`` is summed over colour channels, each spatial (Conv2d / BatchNorm2d) bias term
is upsampled bilinearly (``align_corners=True``) to the input size and summed over channels, and all are
added. Fully connected (``nn.Linear``) terms enter the decomposition but not the map, as in the authors'
code, which keeps only terms shaped like the image. Beyond the authors' code, the implicit bias of clipping
units (``nn.ReLU6`` / ``nn.Hardtanh``: a constant where they saturate) is a bias term too
(``clip_biases=True``), which makes the decomposition exact for ReLU6 networks such as EfficientNet-Lite.
All layer-output gradients come from one backward pass.

The three baselines are TorchRay's pointing-game ones: the saliency is the (modified) gradient of the
target logit with respect to the input, ``max_c |g_c|`` over colour channels (TorchRay's
``gradient_to_saliency``).

* ``gradient`` (Simonyan et al. 2014): the plain gradient.
* ``guided`` (guided backprop, Springenberg et al. 2015): every ``nn.ReLU`` / ``nn.ReLU6`` module passes
  back only positive gradients, and only where its forward input was in the linear range
  (``x > 0``; ``0 < x < 6`` for ReLU6).
* ``deconv`` (DeconvNet, Zeiler & Fergus 2014): every such module passes back ``relu(grad)``, ignoring
  the forward mask.

The ReLU rules are applied by temporarily replacing the ``forward`` of each ``nn.ReLU`` / ``nn.ReLU6``
module of the model (:func:`modified_relus`); in-place modules stay in place. Functional ReLUs
(``F.relu``, ``torch.relu``, ``x.clamp(min=0)`` inside some ``forward``) are NOT modified: they keep the
ordinary gradient. (TorchRay patches ``torch.relu`` globally instead; torchvision's VGG, ResNet, MobileNet
and EfficientNet-Lite use ReLU modules, DenseNet's final ReLU is functional.)
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Explainer, Explanation, Targets, check_batch
from methods.hooks import LayerCapture, swapped_forwards
from methods.options import Option, boolean_from_text, choice, flag, positive_real
from methods.targets import target_gradients, target_scores
from models.spec import ModelSpec

__all__ = [
    "Deconvnet", "FullGrad", "FullGradTerms", "GuidedBackprop", "InputGradient", "build_deconv",
    "build_fullgrad", "build_gradient", "build_guided", "modified_relus",
]


# --------------------------------------------------------------------------------------------------------
# Modified ReLU backward rules


class _ModifiedReLU(torch.autograd.Function):
    """clamp(x, 0, upper) forward (in place if asked); the backward depends on ``rule``.

    The mask is taken from the output: 0 < out < upper exactly where 0 < x < upper, which stays true when
    the input has been overwritten in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None, inplace: bool, rule: str):
        if inplace:
            out = x.clamp_(min=0, max=upper)
            ctx.mark_dirty(out)
        else:
            out = x.clamp(min=0, max=upper)
        ctx.upper, ctx.rule = upper, rule
        if rule == "guided":
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clamp(min=0)
        if ctx.rule == "guided":
            (out,) = ctx.saved_tensors
            linear = out > 0
            if ctx.upper is not None:
                linear = linear & (out < ctx.upper)
            grad = grad.masked_fill(~linear, 0)
        return grad, None, None, None


RULES = ("guided", "deconv")


def _relu_upper(module: nn.Module) -> float | None:
    return 6.0 if isinstance(module, nn.ReLU6) else None


def _patched_forward(module: nn.Module, rule: str):
    upper, inplace = _relu_upper(module), bool(getattr(module, "inplace", False))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _ModifiedReLU.apply(x, upper, inplace, rule)
    return forward


@contextmanager
def modified_relus(model: nn.Module, rule: str) -> Iterator[list[nn.Module]]:
    """Within the block, every ``nn.ReLU`` / ``nn.ReLU6`` module of ``model`` back-propagates by ``rule``
    ('guided' or 'deconv'); the forward values are unchanged. The original ``forward`` attributes are put
    back on exit, also when an exception is raised. Functional ReLUs are not affected."""
    choice("rule", rule, RULES)
    relus = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    with swapped_forwards((module, _patched_forward(module, rule)) for module in relus) as patched:
        yield patched


# --------------------------------------------------------------------------------------------------------
# gradient, guided backprop, DeconvNet


class InputGradient(Explainer):
    """Saliency = max over colour channels of |d S_k / d x| (Simonyan et al. 2014, TorchRay's 'gradient').

    Subclasses set ``rule`` to back-propagate through ReLU modules by a modified rule.
    """

    name = "gradient"
    rule: str | None = None
    # pixel gradients in bfloat16 are mostly rounding noise (measured on CPU: correlation 0.83 with float32)
    mixed_precision = False

    def input_gradients(self, x: torch.Tensor, targets: torch.Tensor):
        """The (modified) gradient of the target logits w.r.t. ``x``, (B, 3, H, W), and the logits."""
        with torch.enable_grad(), self._rules():
            x = x.detach().requires_grad_(True)
            logits = self.model(x)
            (grads,) = target_gradients(logits, targets, x)
        return grads, logits.detach()

    def _rules(self):
        return nullcontext() if self.rule is None else modified_relus(self.model, self.rule)

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        grads, logits = self.input_gradients(x, targets)
        return Explanation(grads.abs().amax(dim=1, keepdim=True), logits)


class GuidedBackprop(InputGradient):
    """Guided backprop (Springenberg et al. 2015): ReLU modules pass back relu(g) where their input was > 0."""

    name = "guided"
    rule = "guided"


class Deconvnet(InputGradient):
    """DeconvNet (Zeiler & Fergus 2014): ReLU modules pass back relu(g) whatever their input."""

    name = "deconv"
    rule = "deconv"


# --------------------------------------------------------------------------------------------------------
# FullGrad


BIAS_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The constant a layer adds per output channel: its bias, or BatchNorm's eval-mode
    beta - gamma * running_mean / sqrt(running_var + eps). None for layers without one (and for
    BatchNorm without running statistics, which normalises with batch statistics even in eval mode)."""
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            return None
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        if module.bias is not None:
            bias = bias + module.bias
        return bias.detach()
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def _bias_times_gradient(module: nn.Module, bias: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad at the layer output (B, C, ...) or (..., C) times the bias of each position's channel."""
    if isinstance(module, nn.Linear):
        return grad * bias
    return grad * bias.view(1, -1, *([1] * (grad.dim() - 2)))


def _clip_bias_times_gradient(module: nn.Hardtanh, output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The implicit bias of a clipping unit (ReLU6 = Hardtanh(0, 6)): where it saturates, its output is
    the constant min_val or max_val (zero slope), elsewhere the identity; grad at the output times that
    constant."""
    output = output.detach()
    low, high = float(module.min_val), float(module.max_val)
    constant = torch.where(output >= high, high, torch.where(output <= low, low, 0.0)).to(grad.dtype)
    return grad * constant


def authors_postprocess(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The FullGrad authors' ``_postProcess``: |t|, then per image (over all channels and positions)
    subtract the minimum and divide by the maximum of the result plus ``eps``."""
    t = t.abs()
    flat = t.flatten(1)
    t = t - flat.min(dim=1).values.view(-1, *([1] * (t.dim() - 1)))
    flat = t.flatten(1)
    return t / (flat.max(dim=1).values.view(-1, *([1] * (t.dim() - 1))) + eps)


class FullGradTerms(NamedTuple):
    """Per-image sums of the full-gradient decomposition (no post-processing): ``input_term`` = sum of
    grad_x * x, ``bias_term`` = sum over layers and positions of grad_b * b, ``logit`` = the target logit.
    For a piecewise-linear network whose biases all sit in the handled layers, input + bias = logit."""

    input_term: torch.Tensor
    bias_term: torch.Tensor
    logit: torch.Tensor


POSTPROCESS_EPS = Option("postprocess_eps", "--postprocess-eps", 1e-6, positive_real,
                         "stabiliser of FullGrad's per-term min-max, (t - min) / (max + eps)", type=float)
ALIGN_CORNERS = Option("align_corners", "--bias-align-corners", True, flag,
                       "FullGrad's bilinear upsampling of the bias maps with align_corners (true, false)",
                       parse=boolean_from_text, shown="true")
CLIP_BIASES = Option("clip_biases", "--clip-biases", True, flag,
                     "FullGrad also counts the implicit biases of ReLU6 / Hardtanh (true, false)",
                     parse=boolean_from_text, shown="true")
FULLGRAD_OPTIONS = (POSTPROCESS_EPS, ALIGN_CORNERS, CLIP_BIASES)


class FullGrad(Explainer):
    """FullGrad saliency (Srinivas & Fleuret 2019), after the authors' ``saliency/fullgrad.py``.

    postprocess_eps: the authors' post-processing constant eps (1e-6). align_corners: their bilinear upsampling of the
    bias maps uses ``align_corners=True``. clip_biases: also count the implicit biases of ``nn.Hardtanh``
    modules (``nn.ReLU6``: the constant 6 where it saturates) as bias terms, in the decomposition and, for
    spatial outputs, in the map. The authors' code has no such terms (its completeness check fails on
    ReLU6 networks); with them the decomposition is exact for EfficientNet-Lite / MobileNetV2, and they
    change nothing for ReLU networks (VGG, ResNet, DenseNet).

    The decomposition is exact for piecewise-linear networks whose biases all live in Conv2d / Linear /
    BatchNorm2d (/ Hardtanh) modules; functional clipping (``F.relu6``), LayerNorm, BatchNorm without
    running statistics or smooth activations (SiLU, GELU) break completeness, which
    :meth:`completeness_terms` exposes. Unlike the authors' constructor, nothing is checked up front.
    """

    name = "fullgrad"
    mixed_precision = False  # its input-gradient term is pixel-level, as InputGradient's

    def __init__(self, model: nn.Module, postprocess_eps: float = POSTPROCESS_EPS.default,
                 align_corners: bool = ALIGN_CORNERS.default, clip_biases: bool = CLIP_BIASES.default):
        super().__init__(model)
        self.postprocess_eps = POSTPROCESS_EPS.validate(postprocess_eps)
        self.align_corners = ALIGN_CORNERS.validate(align_corners)
        self.clip_biases = CLIP_BIASES.validate(clip_biases)

    def bias_layers(self) -> dict[str, nn.Module]:
        """Modules (by name) whose outputs carry a bias term: Conv2d / Linear with a bias, BatchNorm2d with
        running statistics, and (with ``clip_biases``) Hardtanh / ReLU6."""
        return {name: m for name, m in self.model.named_modules()
                if (isinstance(m, BIAS_LAYERS) and effective_bias(m) is not None)
                or (self.clip_biases and isinstance(m, nn.Hardtanh))}

    def decompose(self, x: torch.Tensor, targets: torch.Tensor):
        """One forward and one backward pass: grad_x * x (B, 3, H, W), the list of (layer, grad_b * b)
        terms (shaped like each layer's output) and the logits. Inside :meth:`computing` (eval mode: the
        effective biases are read there)."""
        layers = self.bias_layers()
        # every call of every bias layer recorded (a module run twice gives two terms), the graph kept to x
        with torch.enable_grad(), LayerCapture(layers, cut_graph=False, each_call=True) as capture:
            x = x.detach().requires_grad_(True)
            logits = capture.forward(self.model, x)
            outputs = [output for _, output in capture.records]
            grads = target_gradients(logits, targets, [x] + outputs, allow_unused=True)
            # effective biases are read in eval mode, inside computing()
            terms = []
            for (name, output), grad in zip(capture.records, grads[1:], strict=True):
                module = layers[name]
                if grad is None:
                    continue  # an output that does not reach the target logit
                if isinstance(module, nn.Hardtanh):
                    terms.append((module, _clip_bias_times_gradient(module, output, grad)))
                else:
                    terms.append((module, _bias_times_gradient(module, effective_bias(module), grad)))
        return grads[0] * x.detach(), terms, logits.detach()

    def completeness_terms(self, x: torch.Tensor, targets: Targets = None) -> FullGradTerms:
        """Per-image raw sums of the decomposition; ``input_term + bias_term`` should equal ``logit``
        (targets as :meth:`__call__` takes them)."""
        check_batch(x, self.model)
        with self.computing(x):
            targets = self.resolve(x, targets)
            input_term, terms, logits = self.decompose(x, targets)
        bias_term = torch.zeros(x.shape[0], dtype=input_term.dtype, device=x.device)
        for _, term in terms:
            bias_term = bias_term + term.flatten(1).sum(dim=1)
        return FullGradTerms(input_term.flatten(1).sum(dim=1), bias_term, target_scores(logits, targets))

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        input_term, terms, logits = self.decompose(x, targets)
        size = tuple(x.shape[-2:])
        saliency = authors_postprocess(input_term, self.postprocess_eps).sum(dim=1, keepdim=True)
        for module, term in terms:
            if isinstance(module, nn.Linear) or term.dim() != 4:
                continue  # fully connected terms: in the decomposition, not in the map (as the authors)
            # summing channels before the (linear, per-channel) upsampling saves memory; same result
            channels = authors_postprocess(term, self.postprocess_eps).sum(dim=1, keepdim=True)
            saliency = saliency + F.interpolate(channels, size=size, mode="bilinear",
                                                align_corners=self.align_corners)
        return Explanation(saliency, logits)

    def __repr__(self) -> str:
        return (f"FullGrad(postprocess_eps={self.postprocess_eps}, align_corners={self.align_corners}, "
                f"clip_biases={self.clip_biases})")


# --------------------------------------------------------------------------------------------------------
# Builders


def build_fullgrad(spec: ModelSpec, **options) -> FullGrad:
    """FullGrad for ``spec.model``; options: :data:`FULLGRAD_OPTIONS`."""
    return FullGrad(spec.model, **options)


def build_gradient(spec: ModelSpec, **options) -> InputGradient:
    """No options."""
    return InputGradient(spec.model, **options)


def build_guided(spec: ModelSpec, **options) -> GuidedBackprop:
    """No options."""
    return GuidedBackprop(spec.model, **options)


def build_deconv(spec: ModelSpec, **options) -> Deconvnet:
    """No options."""
    return Deconvnet(spec.model, **options)
