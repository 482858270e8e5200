"""Model registry: the embedded EfficientNet-Lite0, torchvision classifiers and timm models by name."""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from models.efficientnet_lite import build_package_network, efficientnet_lite0, packaged_weights_path
from models.errors import ModelError
from models.names import TIMM_PREFIX, imagenet_categories
from models.spec import ModelSpec
from models.target_layer import check_spatial_layer, find_target_layer, get_layer
from models.tokens import PatchTokens
from models.weights import check_fits, load_into, read_state_dict, warn_random

DEFAULT_MODEL = "efficientnet_lite0"

# The paper's models with their CAM layers (the official code's choices).
PAPER_MODELS = {
    "resnet50": dict(target_layer="layer4"),
    "vgg16": dict(target_layer="features.29"),
    "vgg19": dict(target_layer="features.35"),
    "densenet121": dict(target_layer="features", activation_post=torch.relu),
    "inception_v3": dict(target_layer="Mixed_7c", min_side=75),
}
# Architecture arguments that the pretrained checkpoints of these models were saved with.
PRETRAINED_ARCH_KWARGS = {
    "inception_v3": dict(transform_input=True, aux_logits=True, init_weights=False),
    "googlenet": dict(transform_input=True, aux_logits=True, init_weights=False),
}
MIN_SIDE = {"inception_v3": 75, "googlenet": 15}


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's ImageNet classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Model names; the last entry, ``timm:<name>``, stands for any timm model (timm.list_models())."""
    return [DEFAULT_MODEL] + torchvision_classifiers() + [f"{TIMM_PREFIX}<name>"]


def _default_weights_enum(name: str):
    weights_enum = torchvision.models.get_model_weights(name)
    return getattr(weights_enum, "IMAGENET1K_V1", None) or weights_enum.DEFAULT


def _torchvision_model(name: str, weights: str) -> tuple[nn.Module, int]:
    """Build a torchvision classifier; returns (model, input side)."""
    enum = _default_weights_enum(name)
    side = int(enum.transforms().crop_size[0])
    if weights == "random":
        warn_random(name)
        quiet_init = {"init_weights": False} if name in PRETRAINED_ARCH_KWARGS else {}
        return torchvision.models.get_model(name, weights=None, **quiet_init), side
    if weights == "default":
        cache_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        try:
            return torchvision.models.get_model(name, weights=enum), side
        except (URLError, OSError, ConnectionError, TimeoutError) as exc:
            raise ModelError(
                f"{name} weights {enum} are not cached and cannot be downloaded ({exc.__class__.__name__}): "
                f"put {Path(enum.url).name} at {cache_file} (or set TORCH_HOME), "
                f"or pass --weights PATH to a local state_dict, or --weights random") from None
    model = torchvision.models.get_model(name, weights=None, **PRETRAINED_ARCH_KWARGS.get(name, {}))
    load_into(model, read_state_dict(weights), name, weights)
    return model, side


def torchvision_transformer(name: str, model: nn.Module) -> dict:
    """ModelSpec fields of torchvision's transformers, which take their own input size only (ViT's position
    embeddings, MaxViT's fixed partitions: ``fixed_input``, so UCAG resizes its crops to it). ViT's
    CAM layer is the last encoder block's first LayerNorm, as for timm ViTs (:mod:`models.timm_models`: after
    the last block only the class token reaches the head), read through a token layout (one class token,
    the patch grid of ``conv_proj``). Swin needs nothing: its ``permute`` output is already (B, C, h, w)."""
    if name.startswith("vit_"):
        last = len(model.encoder.layers) - 1
        return dict(target_layer=f"encoder.layers.encoder_layer_{last}.ln_1",
                    activation_post=PatchTokens(model.conv_proj, 1), fixed_input=True)
    if name.startswith("maxvit_"):
        return dict(fixed_input=True)
    return {}


def load_model(name: str = DEFAULT_MODEL, weights: str = "default", device: str | torch.device = "cpu",
               target_layer: str | None = None) -> ModelSpec:
    """Build a classifier by name, ready for explanation.

    weights: 'default' (embedded ImageNet weights for efficientnet_lite0; torchvision's IMAGENET1K_V1,
    from the torch hub cache or downloaded; for ``timm:<name>`` timm's pretrained file from the local
    caches, see :mod:`models.timm_models`), 'random', or a path to a state_dict (timm: also .safetensors).
    target_layer: overrides the CAM layer (dotted module name; :meth:`ModelSpec.with_layer`).
    """
    categories = tuple(imagenet_categories())
    if name.startswith(TIMM_PREFIX):
        from models.timm_models import load_timm  # timm is imported only when a timm model is asked for
        spec = load_timm(name[len(TIMM_PREFIX):], weights)
    elif name == DEFAULT_MODEL:
        if weights == "random":
            warn_random(name)
            state_dict = None
        else:
            path = str(packaged_weights_path()) if weights == "default" else weights
            state_dict = read_state_dict(path)
        if state_dict is not None:
            check_fits(build_package_network(None), state_dict, name, weights)
        model = efficientnet_lite0(state_dict)
        spec = ModelSpec(name, model, "head", categories, weights=weights)
    elif name in torchvision_classifiers():
        model, side = _torchvision_model(name, weights)
        known = dict(PAPER_MODELS.get(name, {}))
        known.setdefault("min_side", MIN_SIDE.get(name, 32))
        known.update(torchvision_transformer(name, model))
        spec = ModelSpec(name, model, known.pop("target_layer", ""), categories, input_size=(side, side),
                         weights=weights, **known)
    else:
        raise ModelError(f"unknown model '{name}'; valid names: {', '.join(available_models())}")
    spec.model.eval().to(device)
    if target_layer:
        spec = spec.with_layer(target_layer)
        check_spatial_layer(spec.model, target_layer, spec.input_size, spec.activation_post)
    elif not spec.target_layer:
        spec = spec.with_layer(find_target_layer(spec.model, spec.input_size))
    get_layer(spec.model, spec.target_layer)
    return spec
