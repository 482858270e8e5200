"""torchvision VGG and ResNet as a chain of relevance steps, without changing the user's model class.

Canonization as zennit does it: every BatchNorm is merged into the convolution before it; a residual
block's skip sum splits relevance in proportion to its two summands; ReLU and Dropout pass relevance
through; max pooling routes it to the maxima; average pooling redistributes it in proportion to inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from methods.errors import MethodError
from methods.relevance import rap, rsp
from methods.relevance.rules import (
    AffineOp,
    Rule,
    affine_relevance,
    gradient_relevance,
    norm_relevance,
    safe_divide,
    stabilize,
)


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
    """One stage of the chain: ``forward`` records what ``relprop`` needs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return self.apply(x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def relprop(self, relevance: torch.Tensor, net: RelevanceNet) -> torch.Tensor:
        return relevance


class Affine(Step):
    def __init__(self, layer: nn.Module, norm: nn.BatchNorm2d | None = None):
        self.weight, self.bias = merged_parameters(layer, norm)
        self.raw_weight = layer.weight.detach()  # RAP works on the convolution itself (BatchNorm passes R)
        self.raw_bias = None if layer.bias is None else layer.bias.detach()
        self.last = False
        if isinstance(layer, nn.Conv2d):
            self.op = AffineOp("conv", layer.stride, layer.padding, layer.dilation, layer.groups)
        else:
            self.op = AffineOp("linear")
        self.first = False

    def apply(self, x):
        return self.op.forward(x, self.weight, self.bias)

    def relprop(self, relevance, net):
        if net.mode == "rsp":
            if self.first:
                return rap.input_propagation(self.op, self.x, self.raw_weight, relevance)
            if self.op.kind != "conv":
                raise ValueError("RSP starts below the classifier; no linear layer is propagated")
            return rsp.hidden_propagation(self.op, self.x, self.raw_weight, relevance)
        if net.mode == "rap":
            if self.last:
                return rap.first_propagation(self.x, self.raw_weight, self.raw_bias, relevance)
            if self.first:
                return rap.input_propagation(self.op, self.x, self.raw_weight, relevance)
            return rap.hidden_propagation(self.op, self.x, self.raw_weight, relevance, nonnegative=True)
        rule = net.first_rule if self.first else net.rule
        # every affine layer but the first follows a ReLU (or pooling of one) in VGG and ResNet
        return affine_relevance(self.op, self.x, self.weight, self.bias, relevance, rule, net.bounds,
                                nonnegative=not self.first)


class Pass(Step):
    def __init__(self, fn=None):
        self.fn = fn

    def apply(self, x):
        return self.fn(x) if self.fn else x


class MaxPool(Step):
    def __init__(self, pool: nn.MaxPool2d):
        self.pool = pool

    def apply(self, x):
        return self.pool(x)

    def relprop(self, relevance, net):
        return gradient_relevance(self.pool, self.x, relevance)


class AvgPool(Step):
    def __init__(self, pool: nn.Module):
        self.pool = pool

    def apply(self, x):
        return self.pool(x)

    def relprop(self, relevance, net):
        return norm_relevance(self.pool, self.x, relevance, net.rule_eps, exact=net.mode == "rap")


class Flatten(Step):
    def apply(self, x):
        return torch.flatten(x, 1)

    def relprop(self, relevance, net):
        return relevance.view(self.x.shape)


class Chain(Step):
    def __init__(self, steps: list[Step]):
        self.steps = steps

    def apply(self, x):
        for step in self.steps:
            x = step.forward(x)
        return x

    def relprop(self, relevance, net):
        for step in reversed(self.steps):
            relevance = step.relprop(relevance, net)
        return relevance


class Residual(Step):
    """out = ReLU(branch(x) + skip(x)); the sum splits relevance in proportion to its two summands."""

    def __init__(self, branch: Chain, skip: Chain | None):
        self.branch, self.skip = branch, skip

    def apply(self, x):
        self.identity = self.skip.forward(x) if self.skip else x
        self.residual = self.branch.forward(x)
        self.total = self.identity + self.residual
        return F.relu(self.total)

    def relprop(self, relevance, net):
        identity, residual = self.identity, self.residual
        if net.mode == "rsp":  # RSP clamps both summands (plus 1e-9) before the proportional split
            identity, residual = identity.clamp(min=0) + 1e-9, residual.clamp(min=0) + 1e-9
        total = identity + residual
        share = safe_divide(relevance, total) if net.mode in ("rap", "rsp") else \
            relevance / stabilize(total, net.rule_eps)
        to_skip, to_branch = identity * share, residual * share
        from_skip = self.skip.relprop(to_skip, net) if self.skip else to_skip
        return from_skip + self.branch.relprop(to_branch, net)


def _sequential_steps(modules) -> list[Step]:
    steps, pending = [], list(modules)
    for i, module in enumerate(pending):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            following = pending[i + 1] if i + 1 < len(pending) else None
            steps.append(Affine(module, following if isinstance(following, nn.BatchNorm2d) else None))
        elif isinstance(module, nn.BatchNorm2d):
            if not steps or not isinstance(steps[-1], Affine):
                raise MethodError("a BatchNorm layer without a preceding convolution is not supported")
        elif isinstance(module, nn.ReLU):
            steps.append(Pass(F.relu))
        elif isinstance(module, nn.Dropout):
            steps.append(Pass())
        elif isinstance(module, nn.MaxPool2d):
            steps.append(MaxPool(module))
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            steps.append(AvgPool(module))
        else:
            raise MethodError(f"relevance propagation does not support {type(module).__name__} layers")
    return steps


def _resnet_block(block: nn.Module) -> Residual:
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        branch = [Affine(block.conv1, block.bn1), Pass(F.relu), Affine(block.conv2, block.bn2), Pass(F.relu),
                  Affine(block.conv3, block.bn3)]
    else:
        branch = [Affine(block.conv1, block.bn1), Pass(F.relu), Affine(block.conv2, block.bn2)]
    skip = Chain(_sequential_steps(block.downsample)) if block.downsample is not None else None
    return Residual(Chain(branch), skip)


SUPPORTED = "torchvision VGG (vgg11..vgg19, with or without _bn) and ResNet (resnet18..resnet152) models"


def build_chain(model: nn.Module) -> Chain:
    """The relevance chain of a torchvision VGG or ResNet; other architectures raise MethodError."""
    if isinstance(model, torchvision.models.VGG):
        features = _sequential_steps(model.features)
        cam_index = len(features) - 1 if isinstance(features[-1], MaxPool) else len(features)
        steps = features + [AvgPool(model.avgpool), Flatten()]
        steps += _sequential_steps(model.classifier)
    elif isinstance(model, torchvision.models.ResNet):
        steps = [Affine(model.conv1, model.bn1), Pass(F.relu), MaxPool(model.maxpool)]
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            steps += [_resnet_block(block) for block in stage]
        cam_index = len(steps)
        steps += [AvgPool(model.avgpool), Flatten(), Affine(model.fc)]
    else:
        raise MethodError(f"relevance methods support {SUPPORTED}, not {type(model).__name__} "
                        "(e.g. --name vgg16 or --name resnet50)")
    chain = Chain(steps)
    chain.cam_index = cam_index  # steps[:cam_index] end at the last convolutional block (RSP's start)
    affine = [step for step in walk(chain) if isinstance(step, Affine)]
    affine[0].first, affine[-1].last = True, True
    return chain


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


class RelevanceNet:
    """Forward through the chain (recording inputs), then propagate relevance from the outputs."""

    def __init__(self, model: nn.Module, rule: Rule, first_rule: Rule,
                 bounds: tuple[torch.Tensor, torch.Tensor], mode: str = "lrp"):
        self.chain = build_chain(model)
        self.rule, self.first_rule, self.bounds, self.mode = rule, first_rule, bounds, mode
        self.rule_eps = 1e-6  # stabiliser of the sum / average-pool redistribution (zennit's Norm)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain.forward(x)

    @torch.no_grad()
    def relprop(self, relevance: torch.Tensor) -> torch.Tensor:
        return self.chain.relprop(relevance, self)

    def block_gradcam_terms(self, targets: torch.Tensor) -> torch.Tensor:
        """w_c A_c at the end of the last convolutional block (Grad-CAM without the channel sum)."""
        head = self.chain.steps[self.chain.cam_index:]
        with torch.enable_grad():
            activation = head[0].x.detach().requires_grad_(True)
            out = activation
            for step in head:
                out = step.apply(out)
            (grads,) = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), activation)
        return grads.mean(dim=(2, 3), keepdim=True) * activation.detach()

    @torch.no_grad()
    def relprop_below(self, relevance: torch.Tensor) -> torch.Tensor:
        """Propagate relevance given at the end of the last convolutional block down to the input."""
        for step in reversed(self.chain.steps[:self.chain.cam_index]):
            relevance = step.relprop(relevance, self)
        return relevance
