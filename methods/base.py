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
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from torch import nn

from common.precision import full_precision
from methods.errors import MethodError
from methods.hooks import restored_state
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


def check_target_range(targets: torch.Tensor, num_classes: int) -> None:
    """MethodError when a target is outside 0..K-1, K = ``num_classes`` (a host sync: the template calls it
    once per user-facing call, never per chunk of a wrapper)."""
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise MethodError(f"target class out of range 0..{num_classes - 1}: {targets.tolist()}")


def targets_or_prediction(targets: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """(B,) targets for a batch whose (B, K) ``logits`` the caller holds: the given ones range-checked, or the
    predicted classes (argmax). For entry points that have the image's logits anyway (UCAG's)."""
    if targets is None:
        return logits.argmax(dim=1)
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
    """Base class and template method: :meth:`__call__` checks the batch, leaves inference mode, normalises
    and range-checks the targets once, restores the model's state and applies the precision; subclasses
    implement only :meth:`explain`, the computation, which receives resolved (B,) int64 targets.

    Wrappers that run an explainer on targets they hold already checked (UCAG's crops, the upscaled
    baseline) call :meth:`explain_resolved` instead: the same state and precision handling, no check.
    """

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
        self._classes: tuple[nn.Module, int] | None = None  # (model, K): the number of classes, once known

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
    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """The computation: maps and logits for ``x`` and its (B,) int64 ``targets`` on x's device, already
        range-checked (never None). Runs in eval mode and in the explainer's precision (see :meth:`computing`)."""

    def explain_prediction(self, x: torch.Tensor, logits: torch.Tensor) -> Explanation:
        """The maps when no target is given: :meth:`explain` for x's predicted classes, ``logits`` being the
        model's no-grad (B, K) logits for ``x``. Methods whose protocol differs without a given target
        (CAMERAS) or that can reuse these logits (UCAG) override it."""
        return self.explain(x, logits.argmax(dim=1))

    def finalize(self, maps: torch.Tensor, size: tuple[int, int] | None = None, antialias: bool = True) -> torch.Tensor:
        """Raw (B, 1, h, w) maps -> final [0, 1] maps at ``size``: ReLU, resize, per-map min-max.
        ``antialias=False``: plain bilinear also when shrinking (the pointing game's reference protocol)."""
        return finalize_maps(maps, size, antialias=antialias)

    def finalize_signed(self, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw maps -> [-1, 1] maps at ``size`` with their sign kept (divided by the largest magnitude)."""
        return finalize_signed(maps, size)

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> Explanation:
        """Explain ``x``: the batch checked, inference mode left (see :func:`outside_inference`), the targets
        normalised (:func:`as_targets`) and range-checked once, the model's state restored and the precision
        applied. ``targets=None`` explains the predicted classes, which costs one extra no-grad forward of
        ``x`` (:meth:`predict`); the scripts always pass targets. Maps and logits come back at least float32."""
        check_batch(x, self.model)
        if torch.is_inference_mode_enabled():
            with outside_inference(x, targets) as (x, targets):
                return self(x, targets)
        targets = as_targets(targets, x.shape[0], x.device)
        with self.computing(x):
            if targets is None:
                result = self.explain_prediction(x, self.predict(x))
            else:
                check_target_range(targets, self.num_classes(x))
                result = self.explain(x, targets)
        return Explanation(widen_half(result.maps), widen_half(result.logits))

    def explain_resolved(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        """The one internal entry point for wrappers (UCAG, the upscaled baseline) that call the explainer
        many times per user-facing call: :meth:`explain` on a checked (B, 3, H, W) batch with (B,) int64
        ``targets`` on x's device whose range the wrapper has checked once (no check, no host sync), with the
        state and precision handling of :meth:`__call__`."""
        with self.computing(x):
            maps, logits = self.explain(x, targets)
        return Explanation(widen_half(maps), widen_half(logits))

    def resolve(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        """(B,) int64 targets for ``x``: the given ones, normalised and range-checked, or the predicted
        classes (one no-grad forward). For a method's own extra entry points (FullGrad's
        ``completeness_terms``); call it inside :meth:`computing`."""
        targets = as_targets(targets, x.shape[0], x.device)
        if targets is None:
            return self.predict(x).argmax(dim=1)
        check_target_range(targets, self.num_classes(x))
        return targets

    @contextmanager
    def computing(self, x: torch.Tensor) -> Iterator[None]:
        """The block runs with the model in eval mode, its train flags and ``requires_grad`` restored on exit
        (:func:`methods.hooks.restored_state`), in float32 for explainers that opt out of autocast
        (``mixed_precision = False``; :func:`common.precision.full_precision`)."""
        precision = nullcontext() if self.mixed_precision else full_precision(x.device.type)
        with restored_state(self.model), precision:
            yield

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model's (B, K) logits for ``x`` (no graph; inside :meth:`computing`, so in the explainer's own
        precision); the number of classes K is remembered."""
        with torch.no_grad():
            logits = self.model(x)
        self._classes = (self.model, logits.shape[1])
        return logits

    def num_classes(self, x: torch.Tensor) -> int:
        """K, the model's number of classes: known after the first forward of :meth:`predict` (so a call
        with given targets costs one extra forward once per explainer, not per call)."""
        known = getattr(self, "_classes", None)
        if known is None or known[0] is not self.model:
            self.predict(x)
        return self._classes[1]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


class Wrapper(Explainer):
    """An explainer around another one (``explainer``, on its model): the sign of its maps and whether the
    official code ranks them raw are the inner explainer's (UCAG's upscaled baseline, the smoothing wrappers)."""

    def __init__(self, explainer: Explainer):
        super().__init__(explainer.model)
        self.explainer = explainer

    @property
    def signed(self) -> bool:
        return self.explainer.signed

    @property
    def official_raw(self) -> bool:
        return self.explainer.official_raw
