"""UCAGConfig: UCAG's settings, frozen and checked once, where the wrapper is built (the scripts' flags
map onto it; a bad value is a UCAGError naming the setting, whoever passes it).

Geometry: crop c (rho * 224, -c), n crops per side (-n), alpha the crops' upscaling (Eq. 1, -a). Then the
blend (ucag.blending), the confidence weighting Y_s (Eq. 4; None: the protocol's default), the fixed crop
input of a one-size model, sigmoid confidence for multi-label models, the crops per call (patch_batch, a
memory bound that changes no number) and the protocol (ucag.protocol: PAPER or OFFICIAL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from ucag.errors import SettingError
from ucag.geometry import check_crop, check_n
from ucag.protocol import PAPER, Protocol


def check_alpha(alpha) -> float:
    """alpha: the crops' upscaling factor, a finite number > 0 (as the scripts' -a/--alpha)."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not (math.isfinite(alpha) and alpha > 0):
        raise SettingError("alpha", "positive and finite", alpha)
    return float(alpha)


def check_flag(name: str, value) -> bool:
    """A setting that is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise SettingError(name, "True or False", value)
    return value


def check_crop_input(crop_input) -> tuple[int, int] | None:
    """None, or the (height, width) every crop is resized to, two positive integers."""
    if crop_input is None:
        return None
    if (isinstance(crop_input, (str, bytes)) or not hasattr(crop_input, "__len__") or len(crop_input) != 2
            or any(isinstance(side, bool) or not isinstance(side, Integral) or side < 1 for side in crop_input)):
        raise SettingError("crop_input", "None or a (height, width) pair of positive integers", crop_input)
    return int(crop_input[0]), int(crop_input[1])


def check_patch_batch(patch_batch) -> int | None:
    """None (as many crops per call as memory holds) or the crops explained per call, an integer >= 1."""
    if patch_batch is not None and (isinstance(patch_batch, bool) or not isinstance(patch_batch, Integral)
                                    or patch_batch < 1):
        raise SettingError("patch_batch", "a positive integer", patch_batch)
    return None if patch_batch is None else int(patch_batch)


@dataclass(frozen=True)
class UCAGConfig:
    """UCAG's settings (see the module); ``confidence`` holds the resolved bool after construction."""

    crop: float = 124
    n: int = 6
    alpha: float = 2.6
    blend: str = "constant"
    confidence: bool | None = None
    crop_input: tuple[int, int] | None = None
    multilabel: bool = False
    patch_batch: int | None = None
    protocol: Protocol = PAPER

    def __post_init__(self):
        if not isinstance(self.protocol, Protocol):
            raise SettingError("protocol", "ucag.protocol.PAPER or OFFICIAL", self.protocol)
        resolved = {
            "crop": check_crop(self.crop), "n": check_n(self.n), "alpha": check_alpha(self.alpha),
            "blend": self.protocol.check_blend(self.blend),
            "confidence": self.protocol.confidence(None if self.confidence is None
                                                   else check_flag("confidence", self.confidence)),
            "crop_input": check_crop_input(self.crop_input),
            "multilabel": check_flag("multilabel", self.multilabel),
            "patch_batch": check_patch_batch(self.patch_batch),
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def official(self) -> bool:
        """run.json's "official": whether the official code's protocol is followed."""
        return self.protocol.official
