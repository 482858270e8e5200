"""The rows of a results table and how a batch is explained by all of them.

A :class:`Row` is a ``(name, explainer)`` pair: the method, the method with UCAG (``name*``) and, for the
pointing game, the center baseline. :func:`batch_targets` computes the batch's image logits once (when the
prediction is explained) and :func:`explain_rows` hands them to every row, so a UCAG row skips its own
forward of the whole images; every row receives explicit targets.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from methods.base import Explainer, Explanation, widen_half
from ucag import UCAG
from ucag.framework import image_logits


@dataclass(frozen=True)
class Row:
    """One line of a results table: its name ('gradcam'; 'gradcam*' with UCAG; 'center') and explainer."""

    name: str
    explainer: Explainer
    ucag: bool = False

    def explain(self, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None = None) -> Explanation:
        """The row's explanation of ``x`` for ``targets``. ``logits``: the model's logits for ``x`` computed
        before (by :func:`batch_targets` or an earlier row); a UCAG row then skips its forward of the whole
        images (its crops are unchanged)."""
        return self.explain_folds(x, targets, logits)[0]

    def explain_folds(self, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None = None,
                      also: str | None = None) -> tuple[Explanation, Explanation]:
        """(the row's explanation, the same crops folded with the UCAG blend ``also``): the crops are explained
        once and folded both ways. Without UCAG, or with ``also`` None or the row's own blend, both are the
        row's explanation."""
        if isinstance(self.explainer, UCAG):
            own = self.explainer.blend
            blends = (own,) if also in (None, own) else (own, also)
            if logits is not None or len(blends) > 1:
                folded = self.explainer.explain_blends(x, targets, blends, logits=logits)
                return folded[blends[0]], folded[blends[-1]]
        explanation = self.explainer(x, targets)
        return explanation, explanation

    def final(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The row's final maps at ``size``: [-1, 1] with the sign kept for signed (relevance) explainers
        (``finalize_signed``), [0, 1] otherwise (``finalize``)."""
        if self.explainer.signed:
            return self.explainer.finalize_signed(maps, size)
        return self.explainer.finalize(maps, size)


def batch_targets(model: torch.nn.Module, x: torch.Tensor,
                  given: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the classes the batch ``x`` is explained for, x's logits when they were computed for it): ``given``
    as it is (no forward), or the model's prediction, argmax of the logits of one no-grad forward (float32
    under a bfloat16 autocast, as :class:`methods.base.Explainer` gives them)."""
    if given is not None:
        return given, None
    logits = widen_half(image_logits(model, x))
    return logits.argmax(dim=1), logits


def explain_rows(rows: Sequence[Row], x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None = None,
                 also: str | None = None) -> Iterator[tuple[Row, Explanation, Explanation]]:
    """(row, its explanation, its fold with the UCAG blend ``also``) of the batch ``x`` for ``targets``, row after
    row. x's logits are computed at most once: ``logits`` given (:func:`batch_targets`), else the first row's,
    reused by every UCAG row after it."""
    for row in rows:
        explanation, folded = row.explain_folds(x, targets, logits, also)
        if logits is None:
            logits = explanation.logits
        yield row, explanation, folded
