"""Excitation backprop: marginal winning probabilities (MWP) and contrastive MWP (c-MWP).

Zhang, Lin, Brandt, Shen & Sclaroff, "Top-down neural attention by excitation backprop", ECCV 2016, as
TorchRay 1.0.0.2 implements it (``torchray.attribution.excitation_backprop``, the Table 2 numbers).

A top-down signal P starts as the one-hot target at the logits and is passed down as a probability. Through
a linear layer ``y = W x + b`` (convolution, fully connected layer, average pooling) the winning probability
of an output is shared among its inputs in proportion to their positive contributions:

    P(x_j) = x_j * sum_i W+_ij P(y_i) / (sum_k W+_ik x_k + 1e-20),   W+ = max(W, 0), the bias left out

(computed as ``x * vjp_{W+}(P / (W+ x + 1e-20))``). BatchNorm passes P unchanged, ReLU / max pooling /
dropout keep their ordinary gradient, and a residual sum ``y = a + b`` splits P in the proportion of its
inputs, ``P(a) = a / y * P(y)`` (zero where y = 0, where TorchRay gives NaN). The MWP map is P at the
output of a chosen layer summed over channels (TorchRay's defaults: VGG16's pool4 ``features.23``,
ResNet50's ``layer3``).

c-MWP contrasts the target with its "dual", the classifier layer with negated weights: TorchRay runs the
signal down once with W and once with -W at the classifier, subtracts the dual's signal at a contrast layer
and propagates the difference down, then clamps the channel sum at 0. Every rule is linear in P for the
fixed forward values and the difference is not clamped on the way (TorchRay's ``non_negative_contrast``
is off), so the contrast layer does not change the result: here the classifier's rule is replaced by its
contrastive form ``x * (vjp_{W+}(P / W+ x) - vjp_{W-}(P / W- x))`` and the difference runs down once, one
forward and one backward. The raw c-MWP map is the channel sum before the clamp (signed); the final
maps' ReLU is TorchRay's clamp.

The rules apply to the ``torch.nn.functional`` calls the modules make (intercepted by a
``TorchFunctionMode`` for the forward of the call, so subclassed convolutions with their own padding
work), and the residual sums of the supported architectures are made explicit by swapping their blocks'
``forward`` for the call (restored afterwards): torchvision VGG, ResNet, DenseNet (no sums) and the
embedded EfficientNet-Lite0. Other architectures hide their sums in code and get a one-line error.
"""
from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models import VGG, DenseNet, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from methods.base import Explainer, Explanation
from methods.errors import MethodError
from methods.hooks import LayerCapture, swapped_forwards
from methods.options import Option
from methods.sise import block_end_layers
from methods.targets import target_gradients
from models.efficientnet_lite import EfficientNetLite0
from models.spec import ModelSpec
from models.target_layer import check_spatial_layer, get_layer

__all__ = ["ContrastiveExcitationBackprop", "ExcitationBackprop", "SALIENCY_LAYER", "build_cmwp", "build_mwp",
           "classifier_layer", "default_layer", "excitation_rules"]

EPS = 1e-20  # TorchRay's guard of the normaliser W+ x


# --------------------------------------------------------------------------------------------------------
# The rules, as autograd functions whose backward passes the winning probability P


def _shared(excite: Callable, x: torch.Tensor, weight: torch.Tensor | None, signal: torch.Tensor) -> torch.Tensor:
    """``vjp_{W}(P / (W x + eps))`` for the layer ``excite(x, W)`` with non-negative weights W (or a pooling)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        contribution = excite(x, weight)
        (back,) = torch.autograd.grad(contribution, x, signal / (contribution.detach() + EPS))
    return back


class _Excite(torch.autograd.Function):
    """Forward: the layer as it is. Backward: P(x) = x * vjp_{W+}(P(y) / (W+ x + eps)); with
    ``contrastive``, minus the same with W- = max(-W, 0) (the dual classifier)."""

    @staticmethod
    def forward(ctx, x, weight, compute, excite, contrastive):
        ctx.excite, ctx.contrastive = excite, contrastive
        ctx.save_for_backward(x, weight)
        return compute()

    @staticmethod
    def backward(ctx, signal):
        x, weight = ctx.saved_tensors
        plus = None if weight is None else weight.clamp(min=0)
        back = _shared(ctx.excite, x, plus, signal)
        if ctx.contrastive:
            back = back - _shared(ctx.excite, x, (-weight).clamp(min=0), signal)
        return x * back, None, None, None, None


class _PassThrough(torch.autograd.Function):
    """Forward: the layer as it is (BatchNorm). Backward: P passes unchanged."""

    @staticmethod
    def forward(ctx, x, compute):
        return compute()

    @staticmethod
    def backward(ctx, signal):
        return signal, None


class _SkipSum(torch.autograd.Function):
    """y = a + b; backward P(a) = a / y * P(y), P(b) = b / y * P(y) (0 where y = 0)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, signal):
        a, b = ctx.saved_tensors
        total = a + b
        ratio = torch.where(total == 0, torch.zeros_like(signal), signal / total)
        return a * ratio, b * ratio


def skip_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The residual sum a + b under excitation backprop's proportional split."""
    return _SkipSum.apply(a, b)


def _without_bias(func: Callable, args: tuple, kwargs: dict) -> Callable:
    """``excite(x, W)``: the conv / linear call with input x, weight W and no bias, its other arguments kept."""
    rest = args[3:]
    options = {key: value for key, value in kwargs.items() if key != "bias"}
    return lambda x, weight: func(x, weight, None, *rest, **options)


def _pooling(func: Callable, args: tuple, kwargs: dict) -> Callable:
    rest = args[1:]
    return lambda x, weight: func(x, *rest, **kwargs)


class ExcitationRules(TorchFunctionMode):
    """While active, the forward's ``F.conv2d`` / ``F.linear`` / ``F.avg_pool2d`` / ``F.adaptive_avg_pool2d``
    / ``F.batch_norm`` calls build excitation-backprop backward rules (only where a graph is recorded); the
    linear call whose weight is ``contrast_weight`` (the classifier) gets the contrastive rule."""

    WEIGHTED = (F.conv1d, F.conv2d, F.conv3d, F.linear)
    POOLS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
             F.adaptive_avg_pool3d)

    def __init__(self, contrast_weight: torch.Tensor | None = None):
        super().__init__()
        self.contrast_weight = contrast_weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        compute = lambda: func(*args, **kwargs)  # noqa: E731 - the call as it is, run inside the Function
        if not torch.is_grad_enabled() or not isinstance(args[0] if args else None, torch.Tensor):
            return compute()
        if func in self.WEIGHTED:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            contrastive = self.contrast_weight is not None and weight is self.contrast_weight
            return _Excite.apply(args[0], weight, compute, _without_bias(func, args, kwargs), contrastive)
        if func in self.POOLS:
            return _Excite.apply(args[0], None, compute, _pooling(func, args, kwargs), False)
        if func is F.batch_norm:
            return _PassThrough.apply(args[0], compute)
        return compute()


# --------------------------------------------------------------------------------------------------------
# Residual sums made explicit (the canonizers), per supported architecture


def _basic_forward(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(skip_sum(out, identity))


def _bottleneck_forward(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(skip_sum(out, identity))


def _mbconv_forward(block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite's MBConv block (no squeeze-excitation in Lite; drop-connect is off in eval)."""
    x = inputs
    if block._block_args.expand_ratio != 1:
        x = block._swish(block._bn0(block._expand_conv(inputs)))
    x = block._swish(block._bn1(block._depthwise_conv(x)))
    x = block._bn2(block._project_conv(x))
    args = block._block_args
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = skip_sum(x, inputs)
    return x


def _blocks(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """(block, canonized forward) for every residual block of a supported architecture; MethodError otherwise."""
    if isinstance(model, (VGG, DenseNet, nn.Sequential)):
        return []  # no residual sums (DenseNet concatenates; a Sequential's layers run one after another)
    if isinstance(model, ResNet):
        blocks = [m for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for m in stage]
        unknown = {type(m).__name__ for m in blocks if type(m) not in (BasicBlock, Bottleneck)}
        if unknown:
            raise MethodError(f"excitation backprop does not know the residual blocks {', '.join(sorted(unknown))}")
        return [(m, _basic_forward if type(m) is BasicBlock else _bottleneck_forward) for m in blocks]
    if isinstance(model, EfficientNetLite0):
        if any(block.has_se for block in model.blocks):
            raise MethodError("excitation backprop does not handle squeeze-excitation blocks")
        return [(block, _mbconv_forward) for block in model.blocks]
    raise MethodError("excitation backprop needs the model's residual sums: it supports torchvision VGG, ResNet "
                      "and DenseNet, nn.Sequential models and the embedded EfficientNet-Lite0, not "
                      f"{type(model).__name__}")


@contextmanager
def excitation_rules(model: nn.Module, contrast_weight: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the model's forward records excitation-backprop rules (its blocks' residual sums
    split proportionally; ``contrast_weight``: the classifier weight that gets the contrastive rule). The
    blocks' ``forward`` attributes are restored on exit, also after an exception. Take the backward pass
    after the block: the rules are built during the forward."""
    canonized = [(block, types.MethodType(forward, block)) for block, forward in _blocks(model)]
    with swapped_forwards(canonized), ExcitationRules(contrast_weight):
        yield


# --------------------------------------------------------------------------------------------------------
# Layers


def default_layer(model: nn.Module) -> str:
    """TorchRay's saliency layer, the input of the last stride-2 stage (stride 16): VGG's fourth max pool
    (``features.23`` in VGG16, pool4), ResNet's ``layer3``, DenseNet's ``features.denseblock3``,
    EfficientNet-Lite0's block before its last stride-2 block."""
    _blocks(model)  # refuses unsupported architectures first
    if isinstance(model, VGG):
        pools = [i for i, module in enumerate(model.features) if isinstance(module, nn.MaxPool2d)]
        return f"features.{pools[-2]}"
    if isinstance(model, ResNet):
        return "layer3"
    if isinstance(model, DenseNet):
        return "features.denseblock3"
    if isinstance(model, nn.Sequential):
        raise MethodError("excitation backprop has no default layer for a Sequential model: name one with "
                          "--saliency-layer")
    return block_end_layers(model)[-2]  # the block ends, shallow to deep, then 'head'


def classifier_layer(model: nn.Module) -> nn.Module:
    """The classifier (the dual's negated layer): the last convolution or linear layer with a weight, as
    TorchRay's ``_get_classifier_layer``."""
    for module in reversed(list(model.modules())):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.weight is not None:
            return module
    raise MethodError("excitation backprop found no classifier (convolution or linear) layer in the model")


def check_layer_name(name: str, value) -> str | None:
    """None (the architecture's default layer) or a dotted module name."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise MethodError(f"{name} must be a module name, got {value!r}")
    return None if value is None else value.strip()


SALIENCY_LAYER = Option("saliency_layer", "--saliency-layer", None, check_layer_name,
                        "excitation backprop's layer: the MWP map is read at its output (a module name)",
                        shown="TorchRay's: VGG pool4, ResNet layer3")


# --------------------------------------------------------------------------------------------------------
# Explainers


class ExcitationBackprop(Explainer):
    """MWP map at ``saliency_layer`` (a module name of ``model``; None: :func:`default_layer`): sum over
    channels of the winning probability P at its output, P seeded with the one-hot target at the logits
    (TorchRay's ``excitation_backprop``)."""

    name = "mwp"
    contrastive = False
    mixed_precision = False  # P is divided by small contributions at every layer

    def __init__(self, model: nn.Module, saliency_layer: str | None = SALIENCY_LAYER.default):
        super().__init__(model)
        _blocks(model)  # an unsupported architecture fails when built, not on its first image
        name = SALIENCY_LAYER.validate(saliency_layer)
        self.saliency_layer = default_layer(model) if name is None else name
        self.layer = get_layer(model, self.saliency_layer)
        self.classifier = classifier_layer(model) if self.contrastive else None

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        contrast = self.classifier.weight if self.contrastive else None
        with torch.enable_grad(), LayerCapture(self.layer) as capture:
            with excitation_rules(self.model, contrast):
                logits = capture.forward(self.model, x)
            activation = capture.activation
            (signal,) = target_gradients(logits, targets, activation)
        return Explanation(signal.sum(dim=1, keepdim=True), logits.detach())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(saliency_layer={self.saliency_layer!r})"


class ContrastiveExcitationBackprop(ExcitationBackprop):
    """c-MWP: P of the target minus P of its dual (the classifier with negated weights), summed over channels
    at ``layer``; signed (the final maps' ReLU is TorchRay's clamp)."""

    name = "cmwp"
    contrastive = True


def _builder(cls):
    def build(spec: ModelSpec, **options) -> Explainer:
        explainer = cls(spec.model, **options)
        check_spatial_layer(spec.model, explainer.saliency_layer, spec.input_size)
        return explainer
    build.__doc__ = f"{cls.__name__} for ``spec``; option: saliency_layer (:data:`SALIENCY_LAYER`)."
    return build


build_mwp = _builder(ExcitationBackprop)
build_cmwp = _builder(ContrastiveExcitationBackprop)
