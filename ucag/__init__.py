"""Unfold and Conquer Attribution Guidance around any explainer."""
from ucag.config import UCAGConfig
from ucag.errors import UCAGError
from ucag.framework import UCAG, UpscaledInput, crop_confidence
from ucag.geometry import CropGrid, crop_starts
from ucag.protocol import OFFICIAL, PAPER, Protocol

__all__ = ["OFFICIAL", "PAPER", "UCAG", "CropGrid", "Protocol", "UCAGConfig", "UCAGError", "UpscaledInput",
           "crop_starts", "crop_confidence"]
