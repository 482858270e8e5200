"""Unfold and Conquer Attribution Guidance around any explainer."""
from ucag.framework import UCAG, patch_confidence
from ucag.geometry import PatchGrid, crop_starts

__all__ = ["UCAG", "PatchGrid", "crop_starts", "patch_confidence"]
