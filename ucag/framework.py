"""UCAG (Hong et al., AAAI 2023): unfold, explain every crop at scale alpha, conquer with confidence.

For an input I and target k:
  I_s = Psi(U(I, rho, n), alpha)                 crops, bicubic upscaling by alpha      (Eq. 1)
  E_s = E(I_s, f, k)                             any explainer, raw partial maps        (Eq. 2-3)
  Y_s = exp(softmax(f(I_s))_k)                   crop confidence                        (Eq. 4)
  M_s = Psi(E_s * Y_s, beta)                     weighted and resized back to the crop  (Eq. 5)
  M   = V(M_s, Gamma)                            folded, divided by the duplication     (Eq. 6)
(``blend="gaussian"``: M = sum w M_s / sum w with a Gaussian window w per crop instead, see ucag.blending.)
The result is raw and signed like any explainer's; :meth:`UCAG.finalize` applies the final ReLU, resize
and min-max (plus the official blur under the OFFICIAL protocol). The settings are a frozen
:class:`ucag.config.UCAGConfig`; what the official code does differently is :mod:`ucag.protocol`'s.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from methods.adapters import CallableExplainer
from methods.base import (
    Explainer,
    Explanation,
    Targets,
    Wrapper,
    as_targets,
    check_batch,
    outside_inference,
    targets_or_prediction,
    widen_half,
)
from methods.batching import batch_for_memory, even_chunks, run_chunks
from methods.hooks import restored_state
from methods.targets import target_probabilities
from ucag.config import UCAGConfig, check_alpha
from ucag.errors import SettingError, UCAGError
from ucag.geometry import CropGrid
from ucag.protocol import Protocol, protocol_for
from ucag.upscaling import UpscaledCrops


@torch.no_grad()
def image_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for the whole images (no graph; the model's state is restored)."""
    with restored_state(model):
        return model(x)


def crop_confidence(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Y = exp(softmax(logits)[target]) per crop (paper Eq. 4); exp(sigmoid(logit)) for multi-label models."""
    return target_probabilities(logits, targets, multilabel).exp()


class UpscaledInput(Wrapper):
    """The official code's baseline for alpha != 1: ``explainer`` on the whole image upscaled by alpha
    (bicubic, align_corners=False, as UCAG's crops); maps come at the explainer's own resolution for the
    upscaled image and :meth:`finalize` brings them to any size."""

    name = "upscaled"

    def __init__(self, explainer: Explainer, alpha: float):
        super().__init__(explainer)
        self.alpha = check_alpha(alpha)

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        height, width = x.shape[-2:]
        logits = image_logits(self.model, x)  # the contract's logits are x's
        scaled = F.interpolate(x, size=(int(height * self.alpha), int(width * self.alpha)), mode="bicubic",
                               align_corners=False)
        return Explanation(self.explainer.explain_resolved(scaled, targets).maps, logits)

    def __repr__(self) -> str:
        return f"UpscaledInput({self.explainer!r}, alpha={self.alpha})"


def _config_setting(name: str) -> property:
    """A read-only attribute of UCAG that reads ``UCAGConfig.<name>``."""
    return property(lambda self: getattr(self.config, name), doc=f"UCAGConfig.{name} (read-only)")


class UCAG(Wrapper):
    """Wraps ``explainer`` (any registered method) into Unfold and Conquer Attribution Guidance.

    config: a :class:`ucag.config.UCAGConfig`; or its settings as keywords (the same names and defaults):
    crop: c, crop side in the 224 frame (rho = c/224). n: crops per side. alpha: upscaling factor.
    patch_batch: crops explained per call (the memory bound; None: as many as half the device's free memory
    holds, :func:`methods.batching.batch_for_memory`). confidence: weight partial maps by Y (None: the
    protocol's default). protocol: ucag.protocol.PAPER (default) or OFFICIAL; ``official=True`` picks
    OFFICIAL (divide by Gamma + 1, blur the final map, no confidence weighting unless asked).
    multilabel: sigmoid instead of softmax in Y. blend: "constant" (the paper's V(., Gamma)) or "gaussian"
    (Gaussian-windowed overlap-add, no crop grid in the map; not with OFFICIAL), see :mod:`ucag.blending`.
    crop_input: (h, w) each crop is resized to instead of alpha * (ch, cw), for models that take one input size
    only (a ViT without position-embedding interpolation); None: Psi(., alpha) as the paper.
    """

    name = "ucag"

    def __init__(self, explainer: Explainer, crop: float = UCAGConfig.crop, n: int = UCAGConfig.n,
                 alpha: float = UCAGConfig.alpha, patch_batch: int | None = None, confidence: bool | None = None,
                 official: bool = False, progress: bool = False, multilabel: bool = False,
                 blend: str = UCAGConfig.blend, crop_input: tuple[int, int] | None = None,
                 protocol: Protocol | None = None, config: UCAGConfig | None = None, model: nn.Module | None = None):
        if not isinstance(explainer, Explainer):  # any f(x, targets) -> maps or (maps, logits), behind one check
            if model is None:
                raise SettingError("model", "the model a callable explainer explains (UCAG(f, model=...))", model)
            explainer = CallableExplainer(model, explainer, name=getattr(explainer, "__name__", "callable"))
        super().__init__(explainer)
        if config is None:
            config = UCAGConfig(crop=crop, n=n, alpha=alpha, blend=blend, confidence=confidence,
                                crop_input=crop_input, multilabel=multilabel, patch_batch=patch_batch,
                                protocol=protocol_for(official) if protocol is None else protocol)
        elif not isinstance(config, UCAGConfig):
            raise SettingError("config", "a ucag.config.UCAGConfig or None", config)
        self.explainer, self.config, self.progress = explainer, config, progress

    @property
    def protocol(self) -> Protocol:
        return self.config.protocol

    # the settings, read-only, from the frozen config (UCAGConfig is their one declaration)
    official = _config_setting("official")
    crop = _config_setting("crop")
    n = _config_setting("n")
    alpha = _config_setting("alpha")
    blend = _config_setting("blend")
    confidence = _config_setting("confidence")
    crop_input = _config_setting("crop_input")
    multilabel = _config_setting("multilabel")
    patch_batch = _config_setting("patch_batch")

    def grid(self, height: int, width: int) -> CropGrid:
        return CropGrid(height, width, self.crop, self.n)

    def scaled_size(self, grid: CropGrid) -> tuple[int, int]:
        """(int(ch * alpha), int(cw * alpha)): the side of each crop given to the explainer (``crop_input``
        when the model takes one input size only)."""
        if self.crop_input is not None:
            return self.crop_input
        ch, cw = grid.crop_size
        return int(ch * self.alpha), int(cw * self.alpha)

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        return self._explain(x, targets, (self.blend,))[self.blend]

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> Explanation:
        """UCAG's one-blend case of :meth:`explain_blends`, which holds the image's logits anyway: the targets
        are checked against them (or predicted from them) once, with no extra forward."""
        return self.explain_blends(x, targets, (self.blend,))[self.blend]

    def explain_blends(self, x: torch.Tensor, targets: Targets, blends: Sequence[str],
                       logits: torch.Tensor | None = None) -> dict[str, Explanation]:
        """{blend: Explanation} for each of ``blends``: the crops are explained once and folded once per blend
        (e.g. the paper's map for the data and the seamless one for a picture, at the cost of one).
        ``logits``: the model's (B, K) logits for ``x`` when the caller already has them (a base row explained
        the same batch); they are returned as given and the image's own forward is skipped."""
        check_batch(x, self.model)
        if torch.is_inference_mode_enabled():
            with outside_inference(x, targets, logits) as (x, targets, logits):
                return self.explain_blends(x, targets, blends, logits)
        for blend in blends:
            self.protocol.check_blend(blend)
        if logits is not None and (logits.dim() != 2 or logits.shape[0] != x.shape[0]):
            raise UCAGError(f"logits of shape {tuple(logits.shape)} do not belong to a batch of {x.shape[0]} images")
        if logits is None:
            logits = image_logits(self.model, x)
        targets = targets_or_prediction(as_targets(targets, x.shape[0], x.device), logits)  # once, not per chunk
        return self._explain(x, targets, tuple(blends), logits)

    def _explain(self, x: torch.Tensor, targets: torch.Tensor, blends: tuple[str, ...],
                 logits: torch.Tensor | None = None) -> dict[str, Explanation]:
        batch, _, height, width = x.shape
        grid = self.grid(height, width)
        if logits is None:
            logits = image_logits(self.model, x)
        scaled = self.scaled_size(grid)
        crops = UpscaledCrops(x, grid, scaled)                   # B*n*n crops at alpha * (ch, cw), by chunk
        crop_targets = targets.repeat_interleave(grid.num_crops)
        partial = torch.empty(len(crops), *grid.crop_size, device=x.device, dtype=torch.float32)
        # Y_s / max_s Y_s per image, applied to the resized partial maps (the official code's score)
        resized_weights = (torch.ones(len(crops), device=x.device)
                           if self.confidence and self.protocol.confidence_after_resize else None)
        patch_batch = self.patch_batch or even_chunks(len(crops), batch_for_memory(self.model, scaled, x.device,
                                                                                  gradients=True))

        def explain_chunk(start: int, stop: int) -> None:
            maps, chunk_logits = self.explainer.explain_resolved(crops[start:stop], crop_targets[start:stop])
            maps = maps.float()
            if self.confidence:
                weights = crop_confidence(chunk_logits, crop_targets[start:stop], self.multilabel)
                if resized_weights is None:
                    maps = maps * weights.view(-1, 1, 1, 1)
                else:
                    resized_weights[start:stop] = weights
            shrinking = maps.shape[-2] > grid.crop_size[0] and self.protocol.antialias
            partial[start:stop] = F.interpolate(maps, size=grid.crop_size, mode="bilinear",
                                                align_corners=False, antialias=shrinking)[:, 0]

        with tqdm(total=len(crops), desc="UCAG crops", leave=False, disable=not self.progress) as bar:
            key = ("ucag", self.explainer.name, scaled, str(x.device))  # the chunk that fit after an OOM, kept
            run_chunks(len(crops), patch_batch, explain_chunk, self.model, key, "UCAG crops", bar.update)
        if resized_weights is not None:
            partial *= self.protocol.normalise_confidence(resized_weights, batch).view(-1, 1, 1)
        logits = widen_half(logits)  # bf16 autocast: float32, as Explainer.__call__ gives
        return {blend: Explanation(self.protocol.fold(grid, partial, blend), logits) for blend in blends}

    def finalize(self, maps: torch.Tensor, size: tuple[int, int] | None = None, antialias: bool = True) -> torch.Tensor:
        """Final [0, 1] UCAG maps: ReLU, resize, min-max (the protocol's: OFFICIAL blurs as the official code)."""
        return self.protocol.finalize(maps, size, antialias)

    def finalize_signed(self, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Final [-1, 1] UCAG maps of a signed explainer (red/blue pictures); OFFICIAL blurs first."""
        return self.protocol.finalize_signed(maps, size)

    def __repr__(self) -> str:
        crop_input = "" if self.crop_input is None else f", crop_input={self.crop_input}"
        return (f"UCAG({self.explainer!r}, c={self.crop}, n={self.n}, alpha={self.alpha}, "
                f"confidence={self.confidence}, official={self.official}, blend={self.blend!r}{crop_input})")
