"""The two UCAG protocols: the paper's (PAPER) and the official code's (OFFICIAL, the scripts' --official).

A protocol owns every effect the choice has, so that the wrapper and the scripts ask it instead of testing
a flag:
  gamma_offset         the divisor of the constant fold: Gamma (paper Eq. 6) or Gamma + 1 (official code)
  antialias            whether shrinking a partial map E_s back to its crop is anti-aliased (paper: yes)
  blur                 the final 5 x 5 Gaussian blur (sigma 3) of the official code's output (official_blur)
  confidence_default   weight the partial maps by Y_s (Eq. 4) unless told otherwise (paper: on, official: off)
  confidence_after_resize
                       how Y_s is applied: paper, E_s * Y_s before the resize (Eq. 5); official code,
                       Y_s / max_s Y_s per image on the resized partial maps
  blends               the folds it allows (official: the constant one only)
  upscaled_baseline    whether the baseline row explains the whole image upscaled by alpha (official code,
                       alpha != 1: ucag.framework.UpscaledInput)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms.functional import gaussian_blur

from methods.postprocess import finalize_maps, finalize_signed
from ucag.blending import BLENDS, blend_fold, check_blend
from ucag.errors import BlendRefused, SettingError
from ucag.geometry import CropGrid


def official_blur(maps: torch.Tensor) -> torch.Tensor:
    """The official UCAG code's final smoothing: 5 x 5 Gaussian, sigma 3, reflect padding."""
    return gaussian_blur(maps, kernel_size=[5, 5], sigma=[3.0, 3.0])


@dataclass(frozen=True)
class Protocol:
    """The effects of one UCAG protocol (see the module); ``official`` is run.json's "official"."""

    name: str
    official: bool
    gamma_offset: int
    antialias: bool
    blur: bool
    confidence_default: bool
    confidence_after_resize: bool
    blends: tuple[str, ...]
    upscaled_baseline: bool

    def divisor(self, gamma: torch.Tensor) -> torch.Tensor:
        """Gamma + gamma_offset: what the constant fold divides the summed partial maps by."""
        return gamma + self.gamma_offset if self.gamma_offset else gamma

    def check_blend(self, blend: str) -> str:
        """``blend`` if it is a known fold this protocol allows, else a UCAGError naming the blend."""
        check_blend(blend)
        if blend not in self.blends:
            raise BlendRefused(blend, self.name, self.blends)
        return blend

    def confidence(self, asked: bool | None) -> bool:
        """Whether the partial maps are weighted by Y_s: ``asked``, or this protocol's default for None."""
        return self.confidence_default if asked is None else asked

    def baseline_is_upscaled(self, alpha: float) -> bool:
        """True where the baseline row explains the whole image upscaled by alpha (the official code's)."""
        return self.upscaled_baseline and alpha != 1

    def normalise_confidence(self, weights: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * n * n,) Y_s -> Y_s / max_s Y_s over each image's crops (confidence_after_resize)."""
        per_image = weights.view(batch, -1)
        return (per_image / per_image.max(dim=1, keepdim=True).values).flatten()

    def fold(self, grid: CropGrid, partial: torch.Tensor, blend: str) -> torch.Tensor:
        """M = V(M_s, Gamma) with this protocol's divisor, or another blend it allows (ucag.blending)."""
        return blend_fold(grid, partial, self.check_blend(blend), self.gamma_offset)

    def finalize(self, maps: torch.Tensor, size: tuple[int, int] | None = None,
                 antialias: bool = True) -> torch.Tensor:
        """Final [0, 1] maps: ReLU, resize, min-max (with ``blur``: ReLU, min-max, blur, resize)."""
        return finalize_maps(maps, size, blur=official_blur if self.blur else None, antialias=antialias)

    def finalize_signed(self, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Final [-1, 1] maps of a signed explainer; with ``blur`` the raw maps are blurred first."""
        if self.blur:
            maps = official_blur(maps.float())
        return finalize_signed(maps, size)


PAPER = Protocol(name="paper", official=False, gamma_offset=0, antialias=True, blur=False,
                 confidence_default=True, confidence_after_resize=False, blends=BLENDS, upscaled_baseline=False)
OFFICIAL = Protocol(name="official", official=True, gamma_offset=1, antialias=False, blur=True,
                    confidence_default=False, confidence_after_resize=True, blends=("constant",),
                    upscaled_baseline=True)


def protocol_for(official: bool) -> Protocol:
    """OFFICIAL for ``official`` (the scripts' --official, run.json's "official"), else PAPER."""
    if not isinstance(official, bool):
        raise SettingError("official", "True or False", official)
    return OFFICIAL if official else PAPER
