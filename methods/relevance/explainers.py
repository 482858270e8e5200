"""Relevance explainers on torchvision VGG / ResNet. Maps are input-level (summed over colour channels),
raw and signed.

LRP, contrastive LRP (CLRP) and softmax-gradient LRP (SGLRP) are one explainer with different output
relevance; RAP, RSP and AGF share :class:`SeededPropagation`: each its own composite of rules and its own
start ("seed") relevance at a step of the chain.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from methods.base import Explainer, Explanation
from methods.errors import MethodError
from methods.options import Option, positive_real
from methods.relevance import agf, rap, rsp
from methods.relevance.network import AvgPool, Composite, Conv, Dropout, Linear, MaxPool, RelevanceNet, ReLU, Residual
from methods.relevance.rules import AlphaBeta, Epsilon, Norm, Pass, Rule, SkipSum, WinnerTakesAll, ZBox, ZPlus

RULES = ("zplus", "alpha2beta1", "epsilon")


def check_rule(name: str, value) -> str:
    """One of :data:`RULES`."""
    if value not in RULES:
        raise MethodError(f"unknown LRP rule {value!r}; valid: {', '.join(RULES)}")
    return value


RULE = Option("rule", "--rule", "zplus", check_rule, f"propagation rule: {', '.join(RULES)}")
EPSILON = Option("epsilon", "--epsilon", 0.25, positive_real, "stabiliser epsilon of --rule epsilon", type=float)
LRP_OPTIONS = (RULE, EPSILON)


def lrp_rule(name: str, epsilon: float) -> Rule:
    """The LRP rule of the registry option ``rule``."""
    if name == "zplus":
        return ZPlus()
    if name == "alpha2beta1":
        return AlphaBeta(alpha=2.0, beta=1.0)
    if name == "epsilon":
        return Epsilon(eps=epsilon)
    raise ValueError(f"unknown LRP rule '{name}'; valid: {', '.join(RULES)}")


def lrp_composite(rule: Rule, bounds: tuple[torch.Tensor, torch.Tensor]) -> Composite:
    """``rule`` on every convolution and linear layer, z^B in ``bounds`` at the input layer, stabilised
    proportional rules (eps 1e-6, zennit's Norm) for average pooling and skip sums."""
    return Composite({Conv: rule, Linear: rule, ReLU: Pass(), Dropout: Pass(), MaxPool: WinnerTakesAll(),
                      AvgPool: Norm(1e-6), Residual: SkipSum(1e-6)}, input_rule=ZBox(*bounds))


class LRP(Explainer):
    """Layer-wise relevance propagation (Bach et al. 2015): ``rule`` on every convolution and linear layer,
    z^B (box) on the input layer with the normalised bounds of [0, 1] pixels. Explained output: the target
    logit (R = one-hot * logit)."""

    name = "lrp"
    signed = True
    official_raw = True  # the official code's 'lrp', 'lrp_ab', 'clrp', 'sglrp' (CLRP, SGLRP inherit it)
    mixed_precision = False  # the rules divide by sums of products that bfloat16 cannot resolve
    memory_format = "contiguous"  # measured faster for the rules' own convolutions (resnet50 AGF: 306 vs 330 ms)

    def __init__(self, model: nn.Module, bounds: tuple[torch.Tensor, torch.Tensor], rule: str = RULE.default,
                 epsilon: float = EPSILON.default):
        super().__init__(model)
        self.composite = lrp_composite(lrp_rule(RULE.validate(rule), EPSILON.validate(epsilon)), bounds)
        RelevanceNet(model, self.composite)  # fail early on unsupported architectures

    def initial_relevance(self, logits: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Output relevance vectors to propagate; the map is their combination (see :meth:`combine`)."""
        one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
        return [one_hot * logits]

    def combine(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return maps[0]

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        net = RelevanceNet(self.model, self.composite)
        logits = net.forward(x)
        maps = [net.relprop(r).sum(dim=1, keepdim=True) for r in self.initial_relevance(logits, targets)]
        return Explanation(self.combine(maps), logits)


def _contrast(target_map: torch.Tensor, others_map: torch.Tensor) -> torch.Tensor:
    """R_target - R_others * sum(R_target) / sum(R_others), per sample."""
    ratio = target_map.flatten(1).sum(1) / others_map.flatten(1).sum(1)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
    return target_map - others_map * ratio.view(-1, 1, 1, 1)


class CLRP(LRP):
    """Contrastive LRP (Gu et al. 2018): LRP of the target minus the rescaled LRP of a virtual class made of
    all other classes, each carrying logit_t / (K - 1)."""

    name = "clrp"

    def initial_relevance(self, logits, targets):
        one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
        target_logit = logits.gather(1, targets[:, None])
        return [one_hot * logits, (1 - one_hot) / (logits.shape[1] - 1) * target_logit]

    def combine(self, maps):
        return _contrast(*maps)


class SGLRP(LRP):
    """Softmax-gradient LRP (Iwana et al. 2019): the softmax gradient as output relevance, p_t (1 - p_t)
    for the target and p_t p_i for the others, contrasted as in CLRP."""

    name = "sglrp"

    def initial_relevance(self, logits, targets):
        probabilities = torch.softmax(logits.float(), dim=1)
        one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
        target_p = probabilities.gather(1, targets[:, None])
        return [one_hot * (probabilities * (1 - probabilities) + 1e-8), (1 - one_hot) * target_p * probabilities]

    def combine(self, maps):
        return _contrast(*maps)


class SeededPropagation(Explainer):
    """RAP, RSP and AGF: the method's :attr:`composite` of rules, propagating a seed relevance given at the
    output of ``chain.steps[:end]`` (see :meth:`seed`) to the input, where the z^B box is the image's own
    min/max (no fixed input box, unlike LRP's)."""

    signed = True
    official_raw = True  # the official code's 'rap', 'rsp', 'agf'
    mixed_precision = False  # as LRP: propagation rules in float32
    memory_format = "contiguous"  # as LRP
    composite: Composite

    def __init__(self, model: nn.Module):
        super().__init__(model)
        RelevanceNet(model, self.composite)  # fail early on unsupported architectures

    @abstractmethod
    def seed(self, net: RelevanceNet, x: torch.Tensor,
             targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """(logits, seed relevance, end): runs the forward and gives the relevance at the output of
        ``net.chain.steps[:end]`` (None: the logits)."""

    def finish(self, relevance: torch.Tensor) -> torch.Tensor:
        """The input relevance (B, 3, H, W) -> the map (B, 1, H, W)."""
        return relevance.sum(dim=1, keepdim=True)

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        net = RelevanceNet(self.model, self.composite)
        logits, relevance, end = self.seed(net, x, targets)
        maps = self.finish(net.relprop(relevance, end))
        return Explanation(maps, logits)


class RAP(SeededPropagation):
    """Relative Attributing Propagation (Nam et al., AAAI 2020); see :mod:`methods.relevance.rap`.
    Seed: the one-hot target at the logits."""

    name = "rap"
    composite = rap.COMPOSITE

    def seed(self, net, x, targets):
        logits = net.forward(x)
        return logits, torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0), None


class RSP(SeededPropagation):
    """Relative Sectional Propagation (Nam et al., AAAI 2021); see :mod:`methods.relevance.rsp`.
    Seed: the Grad-CAM terms w_c A_c at the end of the last convolutional block, divided by their max."""

    name = "rsp"
    composite = rsp.COMPOSITE

    def seed(self, net, x, targets):
        logits = net.forward(x)
        terms = rsp.gradcam_terms(net, targets)
        peak = terms.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
        return logits, terms / (peak + 1e-9), net.block_end


class AGF(SeededPropagation):
    """Attribution Guided Factorization (Gur et al., AAAI 2021); see :mod:`methods.relevance.agf`.
    Seed: x * dy'_t/dx at the input of the output layer (y' the sharpened target); map divided by its max."""

    name = "agf"
    composite = agf.COMPOSITE

    def seed(self, net, x, targets):
        logits = agf.run_streams(net, x, targets)
        last = net.chain.steps[-1]
        return logits, last.x.detach() * last.x.grad, len(net.chain.steps) - 1

    def finish(self, relevance):
        return (relevance / agf.sample_max(relevance)).sum(dim=1, keepdim=True)
