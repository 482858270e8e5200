"""The explained class k of each sample: its logit S_k, its probability P_k and the gradient dS_k/dX.

Every gradient-based method, UCAG's confidence Y = exp(P_k) (Eq. 4) and the metrics use these three
functions, so "score of the target" means one thing throughout. Samples are independent in eval mode,
so the gradient of the summed scores gives each sample its own gradient.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def target_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """S_k per row of (B, K) logits for (B,) targets -> (B,), in the logits' dtype (keeps the graph)."""
    return logits.gather(1, targets[:, None])[:, 0]


def target_probabilities(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """P_k per row: softmax(logits)[k], or sigmoid(logits[k]) for multi-label models; (B,) float32."""
    logits = logits.float()
    if multilabel:
        return torch.sigmoid(target_scores(logits, targets))
    return target_scores(torch.softmax(logits, dim=1), targets)


def target_log_probabilities(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """log P_k per row (log-softmax, or log-sigmoid for multi-label models); (B,) float32."""
    logits = logits.float()
    if multilabel:
        return F.logsigmoid(target_scores(logits, targets))
    return target_scores(torch.log_softmax(logits, dim=1), targets)


def target_gradients(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | Sequence[torch.Tensor],
                     **grad_options) -> tuple[torch.Tensor | None, ...]:
    """d(sum_b S_k(b)) / d inputs: the per-sample gradients of the target logits with respect to ``inputs``
    (tensors in the graph of ``logits``), through :func:`torch.autograd.grad` (no parameter .grad is touched).
    ``grad_options`` pass on (``allow_unused``, ``retain_graph``, ``create_graph``)."""
    return torch.autograd.grad(target_scores(logits, targets).sum(), inputs, **grad_options)
