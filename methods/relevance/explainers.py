"""Relevance explainers on torchvision VGG / ResNet: LRP, contrastive LRP (CLRP) and softmax-gradient
LRP (SGLRP). Maps are input-level (summed over colour channels), raw and signed."""
from __future__ import annotations

import torch
from torch import nn

from methods.base import Explainer, Explanation, resolve_targets
from methods.hooks import restored_state
from methods.relevance.network import Chain, RelevanceNet
from methods.relevance.rules import Rule

RULES = ("zplus", "alpha2beta1", "epsilon")


def make_rule(name: str, epsilon: float) -> Rule:
    if name == "zplus":
        return Rule("zplus")
    if name == "alpha2beta1":
        return Rule("alphabeta", alpha=2.0, beta=1.0)
    if name == "epsilon":
        return Rule("epsilon", eps=epsilon)
    raise ValueError(f"unknown LRP rule '{name}'; valid: {', '.join(RULES)}")


class LRP(Explainer):
    """Layer-wise relevance propagation (Bach et al. 2015): ``rule`` on every convolution and linear layer,
    z^B (box) on the input layer with the normalised bounds of [0, 1] pixels. Explained output: the target
    logit (R = one-hot * logit)."""

    name = "lrp"
    signed = True

    def __init__(self, model: nn.Module, bounds: tuple[torch.Tensor, torch.Tensor], rule: str = "zplus",
                 epsilon: float = 0.25):
        super().__init__(model)
        self.bounds, self.rule = bounds, make_rule(rule, epsilon)
        RelevanceNet(model, self.rule, Rule("zbox"), bounds)  # fail early on unsupported architectures

    def network(self) -> RelevanceNet:
        return RelevanceNet(self.model, self.rule, Rule("zbox"), self.bounds)

    def initial_relevance(self, logits: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Output relevance vectors to propagate; the map is their combination (see :meth:`combine`)."""
        one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
        return [one_hot * logits]

    def combine(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return maps[0]

    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        with restored_state(self.model):
            net = self.network()
            logits = net.forward(x)
            targets = resolve_targets(targets, logits)
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


class RAP(LRP):
    """Relative Attributing Propagation (Nam et al., AAAI 2020); see :mod:`methods.relevance.rap`."""

    name = "rap"

    def network(self) -> RelevanceNet:
        return RelevanceNet(self.model, self.rule, Rule("zbox"), self.bounds, mode="rap")

    def initial_relevance(self, logits, targets):
        return [torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)]


class RSP(LRP):
    """Relative Sectional Propagation (Nam et al., AAAI 2021); see :mod:`methods.relevance.rsp`."""

    name = "rsp"

    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        with restored_state(self.model):
            net = RelevanceNet(self.model, self.rule, Rule("zbox"), self.bounds, mode="rsp")
            logits = net.forward(x)
            targets = resolve_targets(targets, logits)
            start = net.block_gradcam_terms(targets)
            peak = start.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
            start = start / (peak + 1e-9)
            maps = net.relprop_below(start).sum(dim=1, keepdim=True)
        return Explanation(maps, logits)


class AGF(LRP):
    """Attribution Guided Factorization (Gur et al., AAAI 2021); see :mod:`methods.relevance.agf`."""

    name = "agf"

    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        from methods.relevance import agf
        with restored_state(self.model):
            net = RelevanceNet(self.model, self.rule, Rule("zbox"), self.bounds, mode="agf")
            logits, targets = agf.run_streams(net, x, lambda out: resolve_targets(targets, out))
            last = net.chain.steps[-1]
            with torch.no_grad():
                # the last layer starts the relevance stream: x * dy'_t/dx; the rest is a chain below it
                below = Chain(net.chain.steps[:-1])
                relevance = agf.propagate(below, last.x.detach() * last.x.grad, last.x.grad)
                maps = (relevance / agf.sample_max(relevance)).sum(dim=1, keepdim=True)
        return Explanation(maps, logits)
