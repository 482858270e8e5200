"""Unfold and Conquer Attribution Guidance around any explainer."""
from ucag.framework import UCAG, UpscaledInput, patch_confidence
from ucag.geometry import PatchGrid, crop_starts

__all__ = ["UCAG", "PatchGrid", "UpscaledInput", "crop_starts", "patch_confidence"]
