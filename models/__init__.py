"""Classifiers by name with their CAM target layers and preprocessing."""
from models.preprocessing import normalize, preprocess
from models.registry import DEFAULT_MODEL, PAPER_MODELS, available_models, imagenet_categories, load_model
from models.spec import ModelSpec

__all__ = ["DEFAULT_MODEL", "PAPER_MODELS", "ModelSpec", "available_models", "imagenet_categories",
           "load_model", "normalize", "preprocess"]
