"""Unfold and Conquer Attribution Guidance around any explainer."""
from ucag.config import UCAGConfig
from ucag.errors import UCAGError
from ucag.framework import UCAG, UpscaledInput, patch_confidence
from ucag.geometry import PatchGrid, crop_starts
from ucag.protocol import OFFICIAL, PAPER, Protocol

__all__ = ["OFFICIAL", "PAPER", "UCAG", "PatchGrid", "Protocol", "UCAGConfig", "UCAGError", "UpscaledInput",
           "crop_starts", "patch_confidence"]
