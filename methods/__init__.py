"""Explainers under one contract (see :mod:`methods.base`) and one registry by name."""
from methods.base import Explainer, Explanation
from methods.cam import CAM, GradCAM, GradCAMPlusPlus, LayerCAM, WeightedCAM, WGradCAM, XGradCAM
from methods.postprocess import finalize_maps, finalize_signed, min_max
from methods.registry import available_methods, build_explainer, canonical_name, method_options, register

__all__ = ["CAM", "Explainer", "Explanation", "GradCAM", "GradCAMPlusPlus", "LayerCAM", "WeightedCAM", "WGradCAM",
           "XGradCAM", "available_methods", "build_explainer", "canonical_name", "finalize_maps", "finalize_signed",
           "method_options", "min_max", "register"]
