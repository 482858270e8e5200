"""The explainer contract shared by every method, UCAG and the scripts.

An explainer maps a batch ``x: (B, 3, H, W)`` and per-sample targets ``(B,)`` to raw, signed,
unnormalised maps ``(B, 1, h, w)`` on ``x``'s device plus the model's logits ``(B, K)`` for ``x``.
No ReLU, min-max or NumPy happens inside. The final maps every script shows and scores come from one
place, the explainer's own :meth:`Explainer.finalize` (or :meth:`Explainer.finalize_signed` for the
red/blue pictures of signed methods), which wrappers such as UCAG override.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import nn

from common.precision import full_precision
from methods.errors import MethodError
from methods.postprocess import finalize_maps, finalize_signed

Targets = torch.Tensor | Sequence[int] | int | None


class Explanation(NamedTuple):
    """maps: (B, 1, h, w) raw signed saliency; logits: (B, K) model outputs for the explained batch."""

    maps: torch.Tensor
    logits: torch.Tensor


def as_targets(targets: Targets, batch: int, device: torch.device) -> torch.Tensor | None:
    """Normalise targets to a (B,) int64 tensor on ``device`` (None stays None: explain the prediction).
    Float targets are taken when every value is a whole number (3.0 is class 3) and refused otherwise (no
    silent truncation of 2.7 to 2); booleans are refused."""
    if targets is None:
        return None
    tensor = torch.as_tensor(targets, device=device)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise MethodError(f"targets must be class indices (integers), got a {tensor.dtype} tensor")
    if tensor.is_floating_point() and not bool((tensor == tensor.round()).all()):  # NaN and inf fail too
        raise MethodError(f"targets must be class indices (whole numbers), got {tensor.flatten().tolist()[:8]}")
    tensor = tensor.long().flatten()
    if tensor.numel() == 1 and batch > 1:
        tensor = tensor.expand(batch)
    if tensor.numel() != batch:
        raise ValueError(f"got {tensor.numel()} targets for a batch of {batch} images")
    return tensor


# True while a wrapper runs an explainer on targets it has already range-checked (see Explainer.explain_checked)
_TARGETS_CHECKED: ContextVar[bool] = ContextVar("targets_checked", default=False)


@contextmanager
def checked_targets() -> Iterator[None]:
    """Within the block :func:`resolve_targets` trusts given targets: the caller checked their range once
    for the whole user-facing call (the check reads the targets back from the device: one host sync)."""
    token = _TARGETS_CHECKED.set(True)
    try:
        yield
    finally:
        _TARGETS_CHECKED.reset(token)


def check_target_range(targets: torch.Tensor, num_classes: int) -> None:
    """ValueError when a target is outside 0..num_classes-1 (a host sync: call it once per user-facing call)."""
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(f"target class out of range 0..{num_classes - 1}: {targets.tolist()}")


def resolve_targets(targets: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Targets given, or the predicted classes; checks the range against the number of classes (unless a
    wrapper already did, see :func:`checked_targets`)."""
    if targets is None:
        return logits.argmax(dim=1)
    if not _TARGETS_CHECKED.get():
        check_target_range(targets, logits.shape[1])
    return targets


def check_batch(x: torch.Tensor, model: nn.Module) -> None:
    """A (B, 3, H, W) batch with B, H, W >= 1 whose dtype is the model's (floating) parameter dtype; a
    one-line error otherwise (a uint8 image, a float64 batch for a float32 model, an empty batch)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.numel() == 0:
        raise MethodError(f"empty batch of shape {tuple(x.shape)}: nothing to explain")
    if not x.is_floating_point():
        raise MethodError(f"expected a normalised floating-point batch, got {x.dtype} (normalise images with "
                          "models.preprocess)")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.is_floating_point() and x.dtype != parameter.dtype:
        raise MethodError(f"the batch is {x.dtype} but the model's parameters are {parameter.dtype}: convert "
                          f"it with x.to({parameter.dtype}) (bfloat16 arithmetic: run under torch.autocast, "
                          "the scripts' --precision bf16)")


def widen_half(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 / float16 -> float32; float32 and float64 stay as they are."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


@contextmanager
def outside_inference(*tensors) -> Iterator[tuple]:
    """Leave ``torch.inference_mode()`` for the block, with copies of ``tensors`` (the batch, the targets):
    gradients cannot be taken in inference mode, and inference tensors cannot be saved for a backward pass.
    Values that are not tensors pass as they are. The results are ordinary tensors the caller can use."""
    with torch.inference_mode(False):
        yield tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in tensors)


class Explainer(ABC):
    """Base class: subclasses implement :meth:`explain` under the contract above."""

    name = "explainer"
    signed = False  # True for relevance maps whose sign carries meaning (thresholded at 0 by segmentation)
    mixed_precision = True  # False: always computes in float32, also inside a bf16 autocast region
    # True for the methods whose raw signed maps the official UCAG code ranks in insertion/deletion as they
    # are (its ucag() and baseline skip ReLU, min-max and blur for them): see official_ranking_maps
    official_raw = False
    memory_format = "channels_last"  # the model layout the scripts choose for it unless told (--memory-format)

    def __init__(self, model: nn.Module):
        self.model = model
        self._gradients_checked = False

    def check_gradients(self, grads: torch.Tensor, layer: nn.Module) -> None:
        """Warn when dS/dA at ``layer`` is exactly zero for an image of the batch: its map is then all zero and
        ranks pixels in raster order. Checked on the explainer's first call only (one host sync): a layer the
        score does not depend on (a ViT layer after the last attention) gives zeros for every input."""
        if getattr(self, "_gradients_checked", False):
            return
        self._gradients_checked = True
        zero = int(grads.flatten(1).eq(0).all(dim=1).sum())
        if zero:
            name = next((name for name, module in self.model.named_modules() if module is layer), "")
            warnings.warn(f"{self.name}: the gradient of the target score at layer '{name or 'the target layer'}' "
                          f"is exactly zero for {zero} of {len(grads)} images, so their maps are all zero (the "
                          "score does not depend on this layer, e.g. a ViT layer after the last attention: choose "
                          "another --target-layer)", RuntimeWarning, stacklevel=3)

    @abstractmethod
    def explain(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        """Maps and logits for ``x``; ``targets`` is a (B,) tensor or None for the predicted classes."""

    def finalize(self, maps: torch.Tensor, size: tuple[int, int] | None = None, antialias: bool = True) -> torch.Tensor:
        """Raw (B, 1, h, w) maps -> final [0, 1] maps at ``size``: ReLU, resize, per-map min-max.
        ``antialias=False``: plain bilinear also when shrinking (the pointing game's reference protocol)."""
        return finalize_maps(maps, size, antialias=antialias)

    def finalize_signed(self, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw maps -> [-1, 1] maps at ``size`` with their sign kept (divided by the largest magnitude)."""
        return finalize_signed(maps, size)

    def explain_checked(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """Internal entry point for wrappers (UCAG) that call the explainer many times per user-facing call:
        :meth:`explain` on a (B, 3, H, W) batch with (B,) int64 ``targets`` on x's device whose range the
        wrapper has checked once, so no call re-checks them (that check is a host sync per call)."""
        with checked_targets():
            return self._explain_in_precision(x, targets)

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> Explanation:
        """Check the batch and explain it (also inside ``torch.inference_mode()``, see :func:`outside_inference`)."""
        check_batch(x, self.model)
        if torch.is_inference_mode_enabled():
            with outside_inference(x, targets) as (x, targets):
                return self(x, targets)
        return self._explain_in_precision(x, as_targets(targets, x.shape[0], x.device))

    def _explain_in_precision(self, x: torch.Tensor, targets: torch.Tensor | None) -> Explanation:
        """:meth:`explain` in float32 for explainers that opt out of autocast (``mixed_precision = False``);
        maps and logits computed in a half-precision autocast region (``common.precision``) come back as
        float32."""
        if self.mixed_precision:
            maps, logits = self.explain(x, targets)
        else:
            with full_precision(x.device.type):
                maps, logits = self.explain(x, targets)
        return Explanation(widen_half(maps), widen_half(logits))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"
