"""torchvision VGG and ResNet as a chain of relevance steps, without changing the user's model class.

Canonization as zennit does it: every BatchNorm is merged into the convolution before it; a residual
block becomes a skip sum with its branch and skip chains; ReLU, Dropout and pooling are steps of their
own. Which rule a step uses is not decided here: a :class:`Composite` maps step kinds to rule objects
(:mod:`methods.relevance.rules`), once per network, and every step calls its rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from methods.errors import MethodError
from methods.relevance.rules import AffineOp, Rule, SumRule


def merged_parameters(layer: nn.Module, norm: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of ``layer`` with a following BatchNorm folded in."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if norm is None:
        return weight, bias
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias.detach() - norm.running_mean * scale
    bias = shift if bias is None else bias * scale + shift
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias


class Step:
    """One stage of the chain: ``forward`` records the input ``x`` that the step's rule reads."""

    rule: Rule | SumRule | None = None
    input_layer = False    # the affine layer that reads the image
    output_layer = False   # the affine layer that gives the logits
    shared_input = False   # x also feeds a parallel path (first step of a residual branch or skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return self.apply(x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def relprop(self, relevance: torch.Tensor) -> torch.Tensor:
        if self.rule is None:
            raise MethodError(f"this relevance method has no rule for {type(self).__name__} steps")
        return self.rule.relprop(self, relevance)

    def assign_output_gradients(self, gradient: torch.Tensor | None) -> None:
        """Record dy/d(output) of this step, read from a gradient stream run through the chain (AGF)."""
        self.output_gradient = gradient


class Affine(Step):
    """A convolution or linear layer; ``weight``/``bias`` with the following BatchNorm merged in,
    ``raw_weight``/``raw_bias`` the layer's own (RAP, RSP and AGF let BatchNorm pass relevance)."""

    def __init__(self, layer: nn.Module, norm: nn.BatchNorm2d | None, op: AffineOp):
        self.weight, self.bias = merged_parameters(layer, norm)
        self.raw_weight = layer.weight.detach()
        self.raw_bias = None if layer.bias is None else layer.bias.detach()
        self.op = op

    @property
    def nonnegative_input(self) -> bool:
        """In VGG and ResNet every affine layer but the input one reads ReLU outputs (or pooled ones)."""
        return not self.input_layer

    def apply(self, x):
        return self.op.forward(x, self.weight, self.bias)


class Conv(Affine):
    def __init__(self, layer: nn.Conv2d, norm: nn.BatchNorm2d | None = None):
        super().__init__(layer, norm, AffineOp("conv", layer.stride, layer.padding, layer.dilation, layer.groups))


class Linear(Affine):
    def __init__(self, layer: nn.Linear):
        super().__init__(layer, None, AffineOp("linear"))
        self.after_flatten: Flatten | None = None  # the Flatten right before this layer, if any

    @property
    def spatial_input_shape(self) -> torch.Size | None:
        """(B, C, H, W) of the activations flattened into this layer's input, or None."""
        return None if self.after_flatten is None else self.after_flatten.x.shape


class ReLU(Step):
    def apply(self, x):
        return F.relu(x)


class Dropout(Step):
    """Identity in eval mode."""


class MaxPool(Step):
    def __init__(self, pool: nn.MaxPool2d):
        self.pool = pool

    def apply(self, x):
        return self.pool(x)


class AvgPool(Step):
    def __init__(self, pool: nn.Module):
        self.pool = pool

    def apply(self, x):
        return self.pool(x)


class Flatten(Step):
    """A reshape: relevance is reshaped back, whatever the method."""

    def apply(self, x):
        return torch.flatten(x, 1)

    def relprop(self, relevance):
        return relevance.view(self.x.shape)


class Chain(Step):
    def __init__(self, steps: list[Step]):
        self.steps = steps

    def apply(self, x):
        for step in self.steps:
            x = step.forward(x)
        return x

    def relprop(self, relevance, end: int | None = None):
        """Relevance at the output of ``steps[:end]`` (all steps by default) propagated to the chain's input."""
        for step in reversed(self.steps[:end]):
            relevance = step.relprop(relevance)
        return relevance

    def assign_output_gradients(self, gradient):
        for step, following in zip(self.steps, self.steps[1:], strict=False):
            step.assign_output_gradients(following.x.grad)
        self.steps[-1].assign_output_gradients(gradient)


class Residual(Step):
    """out = ReLU(s), s = branch(x) + skip(x); its sum rule splits the relevance between the summands."""

    def __init__(self, branch: Chain, skip: Chain | None):
        self.branch, self.skip = branch, skip

    def apply(self, x):
        self.identity = self.skip.forward(x) if self.skip else x
        self.residual = self.branch.forward(x)
        self.total = self.identity + self.residual
        return F.relu(self.total)

    def relprop(self, relevance):
        if self.rule is None:
            raise MethodError("this relevance method has no rule for residual sums")
        to_skip, to_branch = self.rule.split(self, relevance)
        from_skip = self.skip.relprop(to_skip) if self.skip else to_skip
        return self.rule.join(self, from_skip, self.branch.relprop(to_branch))

    def assign_output_gradients(self, gradient):
        self.output_gradient = gradient
        self.branch.assign_output_gradients(self.total.grad)
        if self.skip:
            self.skip.assign_output_gradients(self.total.grad)


def walk(step: Step, containers: bool = False):
    """Every step in forward order; with ``containers`` the chains and residual blocks too."""
    is_container = isinstance(step, (Chain, Residual))
    if containers or not is_container:
        yield step
    if isinstance(step, Chain):
        for sub in step.steps:
            yield from walk(sub, containers)
    elif isinstance(step, Residual):
        if step.skip:
            yield from walk(step.skip, containers)
        yield from walk(step.branch, containers)


class Composite:
    """Which rule every step uses, chosen once (zennit's layer map with special first/last layers):
    ``input_rule`` for the input layer and ``output_rule`` for the output layer where given, otherwise
    the ``layer_map`` entry of the step's class (or of its nearest base class). Steps without an entry
    keep no rule and refuse to propagate."""

    def __init__(self, layer_map: dict[type[Step], Rule | SumRule], input_rule: Rule | None = None,
                 output_rule: Rule | None = None):
        self.layer_map, self.input_rule, self.output_rule = layer_map, input_rule, output_rule

    def rule_for(self, step: Step) -> Rule | SumRule | None:
        if step.input_layer and self.input_rule is not None:
            return self.input_rule
        if step.output_layer and self.output_rule is not None:
            return self.output_rule
        return next((self.layer_map[kind] for kind in type(step).__mro__ if kind in self.layer_map), None)

    def assign(self, root: Step) -> None:
        for step in walk(root, containers=True):
            step.rule = self.rule_for(step)


def _sequential_steps(modules) -> list[Step]:
    steps, pending = [], list(modules)
    for i, module in enumerate(pending):
        if isinstance(module, nn.Conv2d):
            following = pending[i + 1] if i + 1 < len(pending) else None
            steps.append(Conv(module, following if isinstance(following, nn.BatchNorm2d) else None))
        elif isinstance(module, nn.Linear):
            steps.append(Linear(module))
        elif isinstance(module, nn.BatchNorm2d):
            if not steps or not isinstance(steps[-1], Conv):
                raise MethodError("a BatchNorm layer without a preceding convolution is not supported")
        elif isinstance(module, nn.ReLU):
            steps.append(ReLU())
        elif isinstance(module, nn.Dropout):
            steps.append(Dropout())
        elif isinstance(module, nn.MaxPool2d):
            steps.append(MaxPool(module))
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            steps.append(AvgPool(module))
        else:
            raise MethodError(f"relevance propagation does not support {type(module).__name__} layers")
    return steps


def _resnet_block(block: nn.Module) -> Residual:
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        branch = [Conv(block.conv1, block.bn1), ReLU(), Conv(block.conv2, block.bn2), ReLU(),
                  Conv(block.conv3, block.bn3)]
    else:
        branch = [Conv(block.conv1, block.bn1), ReLU(), Conv(block.conv2, block.bn2)]
    branch[0].shared_input = True
    skip = None
    if block.downsample is not None:
        skip = Chain(_sequential_steps(block.downsample))
        skip.steps[0].shared_input = True
    return Residual(Chain(branch), skip)


SUPPORTED = "torchvision VGG (vgg11..vgg19, with or without _bn) and ResNet (resnet18..resnet152) models"


def build_chain(model: nn.Module) -> tuple[Chain, int]:
    """(chain, block_end) of a torchvision VGG or ResNet: ``chain.steps[:block_end]`` end at the last
    convolutional block (RSP's start). Other architectures raise MethodError."""
    if isinstance(model, torchvision.models.VGG):
        features = _sequential_steps(model.features)
        block_end = len(features) - 1 if isinstance(features[-1], MaxPool) else len(features)
        steps = features + [AvgPool(model.avgpool), Flatten()]
        steps += _sequential_steps(model.classifier)
    elif isinstance(model, torchvision.models.ResNet):
        steps = [Conv(model.conv1, model.bn1), ReLU(), MaxPool(model.maxpool)]
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            steps += [_resnet_block(block) for block in stage]
        block_end = len(steps)
        steps += [AvgPool(model.avgpool), Flatten(), Linear(model.fc)]
    else:
        raise MethodError(f"relevance methods support {SUPPORTED}, not {type(model).__name__} "
                          "(e.g. --name vgg16 or --name resnet50)")
    for before, step in zip(steps, steps[1:], strict=False):
        if isinstance(before, Flatten) and isinstance(step, Linear):
            step.after_flatten = before
    chain = Chain(steps)
    affine = [step for step in walk(chain) if isinstance(step, Affine)]
    affine[0].input_layer, affine[-1].output_layer = True, True
    return chain, block_end


class RelevanceNet:
    """A model's chain with the rules of ``composite``: forward (recording inputs), then relevance back."""

    def __init__(self, model: nn.Module, composite: Composite):
        self.chain, self.block_end = build_chain(model)
        composite.assign(self.chain)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain.forward(x)

    @torch.no_grad()
    def relprop(self, relevance: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Relevance at the output of ``chain.steps[:end]`` (the logits by default) down to the input."""
        return self.chain.relprop(relevance, end)
