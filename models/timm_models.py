"""timm classifiers by name (``timm:<model>``), built to take any input size where the architecture can.

Preprocessing (input size, mean/std, interpolation) comes from the model's own pretrained config. Weights:
'default' loads timm's pretrained file from the local Hugging Face hub cache (or torch hub cache) and never
downloads; 'random'; or a state_dict file (.safetensors, .pth, .bin) in timm's key layout.

CAM layers and token layouts (:mod:`models.tokens`):
- ViT / DeiT (``VisionTransformer`` and subclasses): ``blocks.<last>.norm1``, the tokens entering the last
  block's attention, as pytorch-grad-cam's documentation recommends. The last block's *output* cannot
  be used with class-token pooling: only the class token reaches the head after it, so the patch tokens'
  gradients are exactly zero there; through the last attention every patch token still reaches it.
  Prefix tokens (class, distillation, registers: ``num_prefix_tokens``) are dropped from the map.
- Swin: the last stage (``layers.<last>``), (B, h, w, C), the map the head pools after a per-position
  LayerNorm: the counterpart of ResNet's ``layer4``.
- EVA, BEiT, CaiT, MLP-Mixer: the last block's ``norm1`` as patch tokens too; Swin V2 and other
  channels-last models (``output_fmt == 'NHWC'``): the last stage, read channels-last.
- Other (convolutional) models: :func:`models.target_layer.find_target_layer`, checked against timm's
  own last feature map; transformers whose tokens this module cannot place (Hiera, CrossViT, LeViT, XCiT)
  get a one-line error asking for ``--target-layer`` (see :func:`cnn_target_layer`).

ViT, DeiT and Swin are built with ``dynamic_img_size=True`` (position embeddings resampled, attention masks
built per input), and their patch embedding ignores the last rows/columns of an input whose side is not a
multiple of the patch size (as a strided convolution does), so UCAG's 322-px crops work:
``spec.fixed_input`` says whether a model takes only ``spec.input_size``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from models.errors import ModelError
from models.names import TIMM_PREFIX, imagenet_categories
from models.spec import ModelSpec
from models.target_layer import blank_forward, find_target_layer, get_layer
from models.tokens import ChannelsLastMap, PatchTokens, TokenLayout, feature_grid
from models.weights import check_fits, read_state_dict, warn_random

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------

def check_timm_name(name: str) -> None:
    """ModelError with close matches when timm knows no architecture or pretrained tag ``name``."""
    names = set(timm.list_models()) | set(timm.list_pretrained())
    if name in names:
        return
    arch, _, tag = name.partition(".")
    if tag and arch in names:
        tags = [TIMM_PREFIX + n for n in timm.list_pretrained(f"{arch}.*")]
        more = f", ... ({len(tags)} in all)" if len(tags) > 5 else ""
        raise ModelError(f"timm has no pretrained tag '{tag}' for {arch}; its tags: "
                         f"{', '.join(tags[:5]) or 'none'}{more}")
    close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
    raise ModelError(f"unknown timm model '{name}'{hint} (timm.list_models() lists them all)")


# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------

def crop_to_patches(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a patch embedding: drop the last rows/columns that do not fill a patch."""
    x = args[0]
    ph, pw = module.patch_size
    height, width = x.shape[-2:]
    if height % ph == 0 and width % pw == 0:
        return None
    return (x[..., :height - height % ph, :width - width % pw], *args[1:])


def make_any_size(model: nn.Module) -> int | None:
    """Let the non-strict patch embeddings of ``model`` take sides that are not multiples of the patch size
    (:func:`crop_to_patches`); returns that patch multiple, or None when no patch embedding needed it."""
    multiple = None
    for module in model.modules():
        if isinstance(module, PatchEmbed) and not module.strict_img_size and not module.dynamic_img_pad:
            module.register_forward_pre_hook(crop_to_patches)
            multiple = max(module.patch_size)
    return multiple


def takes_any_size(model: nn.Module) -> bool:
    """False when a patch embedding insists on its image size (non-dynamic ViTs, MLP-Mixers)."""
    return not any(getattr(module, "strict_img_size", False) for module in model.modules())


def create(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with ``dynamic_img_size=True`` where the architecture has that argument."""
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as exc:
        if "dynamic_img_size" not in str(exc):
            raise
    return timm.create_model(name, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights(cfg: dict) -> tuple[Path, bool] | None:
    """(file, custom_load) of the pretrained weights in the local caches, or None; looks, without network,
    where timm would download them: the Hugging Face hub cache, then the torch hub cache for URL weights."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
        for filename in files:
            found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir(), revision=revision or None)
            if isinstance(found, str):
                return Path(found), False
    url = cfg.get("url")
    if url:
        file = torch_hub_checkpoints() / Path(urlparse(url).path).name
        if file.is_file():
            return file, bool(cfg.get("custom_load", False))
    return None


def pretrained_model(name: str) -> nn.Module:
    """The model with timm's pretrained weights from the local caches (a one-line ModelError when absent)."""
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    found = cached_weights(cfg)
    if found is None:
        source = cfg.get("hf_hub_id") or cfg.get("url") or "no published weights"
        raise ModelError(
            f"timm:{name} pretrained weights ({source}) are not in the local caches: looked in {hf_cache_dir()} "
            f"(Hugging Face hub cache; set HF_HOME or HF_HUB_CACHE) and {torch_hub_checkpoints()} (TORCH_HOME); "
            f"nothing is downloaded: fetch them where there is network (huggingface-cli download "
            f"{cfg.get('hf_hub_id') or '<repo>'}), or pass --weights PATH to a .safetensors/.pth file, "
            f"or --weights random")
    file, custom_load = found
    try:
        return create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), custom_load=custom_load))
    except Exception as exc:  # a truncated or foreign cached file: one line, not timm's traceback
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"cannot load cached weights {file} into timm:{name} "
                         f"({exc.__class__.__name__}: {first})") from None


def read_weights(path: str) -> dict:
    """A state_dict from a .safetensors file (the suffix in any case) or a torch checkpoint (see
    weights.read_state_dict)."""
    if not path.lower().endswith(".safetensors"):
        return read_state_dict(path)
    if not Path(path).is_file():
        raise ModelError(f"weights file not found: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"cannot read weights file {path}: not a safetensors file ({first})") from None


def build(name: str, weights: str) -> nn.Module:
    """The timm model ``name`` with 'default', 'random' or file ``weights``, in eval mode."""
    if weights == "default":
        return pretrained_model(name).eval()
    model = create(name, pretrained=False)
    if weights == "random":
        warn_random(TIMM_PREFIX + name)
    else:
        state_dict = read_weights(weights)
        check_fits(model, state_dict, TIMM_PREFIX + name, weights)
        model.load_state_dict(state_dict)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# What the explainers need
# ----------------------------------------------------------------------------------------------------

def categories_for(model: nn.Module) -> list[str]:
    """ImageNet-1k names for 1000 classes, timm's ImageNet-21k/22k/12k names when the head is one of those,
    else 'class i'."""
    count = model.num_classes
    if count == 1000:
        return imagenet_categories()
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        if info.num_classes() == count:
            return [info.index_to_description(i) for i in range(count)]
    return [f"class {i}" for i in range(count)]


def token_target(model: nn.Module) -> tuple[str, TokenLayout] | None:
    """(CAM layer, token layout) of a ViT/DeiT or Swin, None for other models (see the module docstring)."""
    if isinstance(model, VisionTransformer):
        last = len(model.blocks) - 1
        if isinstance(model.blocks[last], Block) or last == 0:
            layer = f"blocks.{last}.norm1"   # pre-norm block: norm1 feeds the last attention
        else:
            layer = f"blocks.{last - 1}"     # other block types: the tokens entering the last block
        return layer, PatchTokens(model.patch_embed, model.num_prefix_tokens)
    if isinstance(model, SwinTransformer):
        return f"layers.{len(model.layers) - 1}", ChannelsLastMap()
    return None


def token_block_ends(model: nn.Module) -> list[str] | None:
    """SISE's layers for a timm transformer whose layout this module reads (None for other models).

    Swin and other channels-last models (``output_fmt == 'NHWC'``): every stage's output (the map before
    the next stage's patch merging halves it). ViT and the row-major token models: they have no resolution
    drops, so their depth is cut into four equal parts like a ResNet's four stages: the outputs of blocks
    ``depth*k//4 - 1`` for k = 1..3, then the CAM layer (the last block's ``norm1``).
    """
    if isinstance(model, SwinTransformer) or getattr(model, "output_fmt", None) == "NHWC":
        info = getattr(model, "feature_info", None)
        return [entry["module"] for entry in info] if info else None
    target = token_target(model)
    blocks = getattr(model, "blocks", None)
    if target is None and type(model).__name__ in ROW_MAJOR_TOKEN_MODELS and isinstance(blocks, nn.Module):
        target = (f"blocks.{len(blocks) - 1}.norm1", None)
    if target is None:
        return None
    depth = len(model.blocks)
    ends = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3)} - {depth - 1})
    return [f"blocks.{i}" for i in ends] + [target[0]]


# Other timm token models whose blocks hold [prefix tokens] + patch tokens in row-major order after a timm
# PatchEmbed (the prefix is absent where the class token joins later, as in CaiT's class-attention blocks).
ROW_MAJOR_TOKEN_MODELS = ("Eva", "Beit", "Cait", "MlpMixer")


@torch.no_grad()
def layer_output(model: nn.Module, name: str, input_size: tuple[int, int]):
    """The output of layer ``name`` in one eval-mode forward of a black (1, 3, *input_size) image."""
    outputs = []
    handle = get_layer(model, name).register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        blank_forward(model, input_size)
    finally:
        handle.remove()
    return outputs[-1] if outputs else None


def patch_embedding(model: nn.Module) -> nn.Module | None:
    """The model's timm PatchEmbed (``patch_embed``, or the first one, e.g. MLP-Mixer's ``stem``)."""
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, PatchEmbed):
        return embed
    return next((module for module in model.modules() if isinstance(module, PatchEmbed)), None)


def sequence_target(model: nn.Module, input_size: tuple[int, int]) -> tuple[str, TokenLayout] | None:
    """``blocks.<last>.norm1`` read as patch tokens for the architectures of ROW_MAJOR_TOKEN_MODELS; the
    number of prefix tokens there is measured (0 where the class token joins after these blocks)."""
    blocks, embed = getattr(model, "blocks", None), patch_embedding(model)
    if (type(model).__name__ not in ROW_MAJOR_TOKEN_MODELS or embed is None
            or not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks)
            or not hasattr(blocks[-1], "norm1")):
        return None
    name = f"blocks.{len(blocks) - 1}.norm1"
    output = layer_output(model, name, input_size)
    height, width = feature_grid(embed, input_size)
    prefix = output.shape[1] - height * width if isinstance(output, torch.Tensor) and output.dim() == 3 else -1
    if not 0 <= prefix <= max(int(getattr(model, "num_prefix_tokens", 0) or 0), 0):
        return None
    return name, PatchTokens(embed, prefix)


def feature_kind(output, channels: int) -> str:
    """'nchw', 'nhwc', 'tokens' or 'other': how a (last) feature output with ``channels`` channels is laid
    out."""
    if not isinstance(output, torch.Tensor):
        return "other"
    if output.dim() == 4 and output.shape[1] == channels:
        return "nchw"
    if output.dim() == 4 and output.shape[-1] == channels:
        return "nhwc"
    return "tokens" if output.dim() == 3 else "other"


def cnn_target_layer(model: nn.Module, input_size: tuple[int, int]) -> tuple[str, TokenLayout | None]:
    """(CAM layer, layout) of a timm model that is neither a ViT nor a Swin, checked against timm's own last
    feature map F (``feature_info[-1]``), so that no NHWC map or attention matrix is read as (B, C, h, w):

    - F in (B, h, w, C) (Swin V2, MambaOut: ``output_fmt == 'NHWC'``): F, read channels-last;
    - a row-major token model (:func:`sequence_target`): its last block's tokens;
    - F in (B, C, h, w): the last spatial module :func:`find_target_layer` finds (ResNet's ``layer4``, the
      head convolution after EfficientNet's last stage), F itself when that module lies inside F (a
      convolution within PVT's last stage) or is a pass-through Identity (ConvNeXt's ``norm_pre``);
    - otherwise (tokens of an unknown order, lists): a ModelError asking for --target-layer.
    """
    feature_info = getattr(model, "feature_info", None)
    last = feature_info[-1] if feature_info else None
    kind = feature_kind(layer_output(model, last["module"], input_size), last["num_chs"]) if last else "nchw"
    if kind == "nhwc":
        return last["module"], ChannelsLastMap()
    sequence = sequence_target(model, input_size)
    if sequence is not None:
        return sequence
    name = find_target_layer(model, input_size)
    if kind != "nchw" or any("attn" in part for part in name.split(".")):
        raise ModelError(f"no CAM layer is known for {type(model).__name__}: its last feature map is not a "
                         f"(B, C, h, w) map and its token layout is not one this toolkit reads; pass "
                         f"--target-layer NAME of a layer with a (B, C, h, w) output")
    if last and (name.startswith(last["module"] + ".") or isinstance(get_layer(model, name), nn.Identity)):
        return last["module"], None
    return name, None


def timm_spec(model: nn.Module, name: str, weights: str = "default") -> ModelSpec:
    """ModelSpec of a timm classifier ``model`` (weights already in, from ``weights``): preprocessing from its
    pretrained config, CAM layer and token layout, any-size inputs where the architecture allows."""
    data = resolve_data_config({}, model=model)
    size = tuple(int(v) for v in data["input_size"][-2:])
    multiple = make_any_size(model)
    feature_info = getattr(model, "feature_info", None)
    min_side = int(feature_info[-1].get("reduction", 32)) if feature_info else 32
    layer, layout = token_target(model) or cnn_target_layer(model, size)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return ModelSpec(name, model, layer, tuple(categories_for(model)), input_size=size, mean=tuple(data["mean"]),
                     std=tuple(data["std"]), activation_post=layout, min_side=min_side, weights=weights,
                     timm_model=f"{cfg.get('architecture', name)}{'.' + cfg['tag'] if cfg.get('tag') else ''}",
                     resize_interpolation=data.get("interpolation", "bilinear"), crop_pct=data.get("crop_pct"),
                     fixed_input=not takes_any_size(model), input_multiple=multiple)


def load_timm(name: str, weights: str) -> ModelSpec:
    """``timm:<name>`` (the prefix stripped) as a ModelSpec on the CPU."""
    check_timm_name(name)
    return timm_spec(build(name, weights), TIMM_PREFIX + name, weights)
