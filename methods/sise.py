"""SISE (Sattarzadeh et al., AAAI 2021) and Ada-SISE (Sudhakar et al., ICASSP 2021).

Semantic Input Sampling for Explanation probes the model with attribution masks built from the feature
maps at the end of every convolutional block and fuses the per-block visualization maps:

1. Layers: the last layer of each convolutional block, i.e. the module whose output feeds a resolution
   drop (:func:`block_end_layers`), plus the CAM layer at the end.
2. Feature filtering (one forward and one backward pass, hooks on all layers at once): the channel
   significance is the spatial average of the gradient of the target's score,
   ``a_c = mean_ij dP_k / dA_c``. SISE keeps ``a_c > 0`` (the official code keeps
   ``a_c > mu * max_c a_c`` with mu = 0). Ada-SISE normalises ``a' = a / max_c a``, takes the Otsu
   threshold ``t`` of the positive normalised values (``cv2.threshold`` with THRESH_OTSU on
   ``uint8(a' * 255)``) and keeps the upper Otsu class, ``uint8(a'_c * 255) > t`` (the channels
   THRESH_BINARY marks; the official code compares ``a'_c > t / 255`` in floats, which also keeps
   the fractional values inside the threshold's own uint8 level). The top channel is always kept
   (``t < 255``) and, taken among the positive channels, the set is a subset of SISE's. The gradient
   is taken of log P_k, which has the sign and the normalised values of dP_k / dA (the two differ by
   the positive factor 1 / P_k) without P_k's underflow for confident predictions.
3. Attribution masks: every kept channel is upsampled bilinearly to H x W and min-max normalised to
   ``M_m`` in [0, 1] (constant channels are skipped, as in the official codes); its score is
   ``s_m = P_k(x * M_m)``, the softmax (sigmoid for multi-label models) probability of the target for the
   masked input, batched over the flattened (image, channel) pairs of the whole batch in chunks of
   ``mask_batch``. The layer's visualization map is ``V = sum_m s_m M_m / sum_ij M_m`` for SISE (the
   official ``visualize_layers`` divides every mask by its area) and ``V = sum_m s_m M_m`` for Ada-SISE
   (its official code), then min-max normalised per image.
4. Block-wise fusion, shallow to deep as both official codes: ``E = V_1`` and, for every deeper layer,
   ``E <- (E + V_l) * G(V_l)``, the deeper map gating the sum. ``G`` is built from the Otsu threshold
   ``t`` of ``uint8(V_l * 255)`` (OpenCV):

   * ``fusion="soft"`` (SISE's default, its official ``otsu_sigmoid`` with T = 100 and tau = 1.5):
     ``G = sigmoid(T (V_l - thr))`` with ``thr = tau t / 255`` when fewer than 10 % of the pixels reach
     ``round(tau t)``, else ``t / 255``.
   * ``fusion="hard"`` (Ada-SISE's default, its official code): ``G = [uint8(V_l * 255) > t]``, the
     binary image of ``cv2.threshold(..., THRESH_BINARY + THRESH_OTSU)``.

   A layer whose map is constant for an image (no kept channel, or all masks scored alike) is left out
   of that image's fusion. The fused map E (>= 0) is returned without a final normalisation.

Sources: the SISE reference code (Keras; ``create_attribution_masks``, ``visualize_layers``, ``otsu``,
``otsu_sigmoid``, ``fuse_visualization_maps``, ``layer_finder``) and the Ada-SISE reference code
(TensorFlow; Otsu on the normalised positive gradients, hard Otsu block fusion); no code is copied.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG, DenseNet, ResNet
from tqdm.auto import tqdm

from methods.base import Explainer, Explanation
from methods.batching import MASK_BATCH, batch_for_memory, run_chunks
from methods.errors import MethodError
from methods.hooks import LayerCapture, Post, restored_state
from methods.options import Option, choice
from methods.targets import target_log_probabilities, target_probabilities
from models.efficientnet_lite import EfficientNetLite0
from models.errors import ModelError
from models.spec import ModelSpec
from models.target_layer import find_target_layer
from models.tokens import TokenLayout

FUSIONS = ("soft", "hard")


def check_fusion(name: str, value) -> str | None:
    """One of :data:`FUSIONS`, or None for the method's own (SISE: soft, Ada-SISE: hard)."""
    return None if value is None else choice(name, value, FUSIONS)


FUSION = Option("fusion", "--fusion", None, check_fusion,
                "block fusion gate G: soft (Otsu sigmoid) or hard (Otsu threshold)",
                shown="soft for sise, hard for adasise")


def check_layer_list(name: str, value) -> tuple[str, ...] | None:
    """None (the block ends) or a non-empty sequence of distinct module names (a comma-separated string too);
    whether each exists in the model is checked when the explainer is built."""
    if value is None:
        return None
    names = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    if (isinstance(names, bytes) or not isinstance(names, Sequence) or not names
            or not all(isinstance(item, str) and item for item in names) or len(set(names)) != len(names)):
        raise MethodError(f"{name} must be a non-empty list of distinct module names, got {value!r}")
    return tuple(names)


LAYERS = Option("layers", "--sise-layers", None, check_layer_list,
                "the layers whose feature maps are the masks (dotted module names)", nargs="+",
                shown="the end of each convolutional block")


# ----------------------------------------------------------------------------------------------------
# Layer selection
# ----------------------------------------------------------------------------------------------------

def block_end_layers(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> list[str]:
    """Dotted names of the last layer of every convolutional block, shallow to deep.

    VGG: the inputs of the max-pool layers (the ReLUs before them). ResNet: the stem's ReLU (the input
    of its max pool) and ``layer1``..``layer4``. DenseNet: the stem's ReLU, every dense block followed
    by a transition, and ``features.norm5`` (the explainers apply the ReLU of DenseNet's ``forward``).
    EfficientNet-Lite0: the block before each stride-2 block, then the CAM layer ``head``. timm ViT/DeiT
    and Swin: :func:`models.timm_models.token_block_ends` (Swin's stage outputs; a ViT's blocks at each
    quarter of its depth, then its CAM layer). Other models: :func:`traced_block_ends` on an
    ``input_size`` probe.
    """
    if isinstance(model, VGG):
        return [f"features.{i - 1}" for i, module in enumerate(model.features)
                if isinstance(module, nn.MaxPool2d) and i > 0]
    if isinstance(model, ResNet):
        return ["relu", "layer1", "layer2", "layer3", "layer4"]
    if isinstance(model, DenseNet):
        names = [name for name, _ in model.features.named_children()]
        ends = [f"features.{names[i - 1]}" for i, name in enumerate(names)
                if i > 0 and (name.startswith("pool") or name.startswith("transition"))]
        return ends + (["features.norm5"] if "norm5" in names else [])
    if isinstance(model, EfficientNetLite0):
        ends = []
        for i, block in enumerate(model.blocks):
            stride = block._depthwise_conv.stride
            if max(stride if isinstance(stride, (tuple, list)) else (stride,)) > 1:
                ends.append("stem" if i == 0 else f"blocks.{i - 1}")
        return ends + ["head"]
    if type(model).__module__.startswith("timm."):
        from models.timm_models import token_block_ends  # imports timm, loaded only for timm models
        ends = token_block_ends(model)
        if ends is not None:
            return ends
    return traced_block_ends(model, input_size)


def _spatial(value) -> tuple[int, int] | None:
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return tuple(value.shape[-2:])
    return None


def traced_block_ends(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> list[str]:
    """Block ends found by tracing one forward pass of a zero ``input_size`` image.

    Every module call is recorded with its input and output spatial sizes. A resolution drop is a call
    whose output side is at most 3/4 of its input side (the official finder likewise ignores the few
    pixels a padding-less convolution loses), contains no such call, and whose enclosing calls all reduce
    the resolution too (a squeeze-excitation pooling does not). The drop is widened to the outermost
    enclosing call that performs only that drop (a ResNet stage, a DenseNet transition); the block end
    is the call that finished last before it started, when its output has the pre-drop size and the
    module runs once per forward. The CAM layer (:func:`models.target_layer.find_target_layer`) is
    appended unless its output is already one of them.
    """
    calls: list[dict] = []
    open_calls: dict[str, list] = {}
    clock = itertools.count()

    def pre_hook(name):
        def hook(module, inputs):
            open_calls.setdefault(name, []).append({"name": name, "start": next(clock), "in": _spatial(inputs)})
        return hook

    def post_hook(name):
        def hook(module, inputs, output):
            record = open_calls[name].pop()
            record.update(end=next(clock), out=_spatial(output), output=output)
            calls.append(record)
        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(post_hook(name)))
        device = next(model.parameters()).device
        with restored_state(model), torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()

    counts: dict[str, int] = {}
    for call in calls:
        counts[call["name"]] = counts.get(call["name"], 0) + 1

    def contains(outer, inner):
        return outer["start"] < inner["start"] and inner["end"] < outer["end"]

    def reduces(call):  # by a quarter or more: a padding-less convolution's border loss is no drop
        return (call["in"] is not None and call["out"] is not None
                and (4 * call["out"][0] <= 3 * call["in"][0] or 4 * call["out"][1] <= 3 * call["in"][1]))

    reducing = [call for call in calls if reduces(call)]
    minimal = [call for call in reducing if not any(contains(call, other) for other in reducing)]
    drops = [call for call in minimal
             if all(reduces(outer) for outer in calls if contains(outer, call))]

    chosen: list[dict] = []
    for drop in drops:
        widest = drop
        ancestors = sorted((c for c in calls if contains(c, drop)), key=lambda c: c["end"] - c["start"])
        for outer in ancestors:
            inner_drops = [d for d in drops if contains(outer, d)]
            if (outer["in"] == drop["in"] and outer["out"] == drop["out"]
                    and all(d["in"] == drop["in"] and d["out"] == drop["out"] for d in inner_drops)):
                widest = outer
            else:
                break
        before = [c for c in calls if c["end"] < widest["start"]]
        if not before:
            continue
        previous = max(before, key=lambda c: c["end"])
        if (previous["out"] == drop["in"] and counts[previous["name"]] == 1
                and all(previous is not c for c in chosen)):
            chosen.append(previous)

    try:
        cam_name = find_target_layer(model, input_size)
    except ModelError:
        cam_name = None
    cam_calls = [c for c in calls if c["name"] == cam_name]
    if len(cam_calls) == 1 and all(c["output"] is not cam_calls[0]["output"] for c in chosen):
        chosen.append(cam_calls[0])
    return [call["name"] for call in sorted(chosen, key=lambda c: c["end"])]


# ----------------------------------------------------------------------------------------------------
# Otsu thresholds (OpenCV)
# ----------------------------------------------------------------------------------------------------

def to_uint8(values: torch.Tensor) -> torch.Tensor:
    """``uint8(v * 255)`` of values in [0, 1], truncating as NumPy's ``astype(np.uint8)``."""
    return (values.float().clamp(0, 1) * 255).to(torch.uint8)


def otsu_level(levels: np.ndarray) -> float:
    """OpenCV's Otsu threshold (uint8 units) of a 1-D uint8 array."""
    return cv2.threshold(levels.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]


def otsu_thresholds(values: torch.Tensor, valid: torch.Tensor | None = None) -> np.ndarray:
    """Per-row Otsu thresholds (uint8 units, as ``cv2.threshold`` returns them) of ``uint8(values * 255)``.

    values: (B, N) in [0, 1]; valid: optional (B, N) bool selecting the entries each row's histogram
    uses. One host copy for the whole batch; rows with no valid entry get 0.
    """
    values = values.detach().float()
    if valid is not None:
        values = torch.where(valid, values, torch.full_like(values, float("nan")))
    host = values.cpu().numpy()  # kept on the host, see SISE._gate
    thresholds = np.zeros(host.shape[0], dtype=np.float64)
    for row, data in enumerate(host):
        data = data[~np.isnan(data)]
        if data.size:
            levels = (np.clip(data, 0, 1) * np.float32(255)).astype(np.uint8)
            thresholds[row] = otsu_level(levels)
    return thresholds


# ----------------------------------------------------------------------------------------------------
# Explainers
# ----------------------------------------------------------------------------------------------------

def _varies(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """span above float rounding of the magnitude (constant maps are not normalised)."""
    rounding = 16 * torch.finfo(high.dtype).eps * torch.maximum(high.abs(), low.abs())
    return (high - low) > rounding


class SISE(Explainer):
    """SISE: positive-average-gradient channels of every block end, masked-input scores, Otsu fusion.

    layers: dotted module names, any order (fused in execution order). posts: per-layer idempotent ops
    applied to the layer output (DenseNet's final ReLU). mask_batch: masked images per forward pass.
    fusion: 'soft' (default here) or 'hard' gating, see the module docstring. multilabel: sigmoid scores.
    After :meth:`explain`, ``last_selection`` maps every layer to the (B, C) bool channel selection.
    """

    name = "sise"
    # float32 also in a bf16 autocast region: the Otsu gates and channel selections amplify bf16 rounding (measured
    # on CPU, bundled photos: bf16 maps differ by up to 0.62, correlation 0.94-0.96, 25-30x Grad-CAM's difference)
    mixed_precision = False
    default_fusion = "soft"
    area_normalise = True        # V = sum s_m M_m / |M_m| (official SISE); Ada-SISE: plain sum
    temperature = 100.0          # T of the soft Otsu gate
    tau = 1.5                    # the official otsu()'s raised threshold for small salient regions
    progress_desc = "SISE masks"

    def __init__(self, model: nn.Module, layers: Sequence[str], posts: dict[str, Post] | None = None,
                 mask_batch: int | None = MASK_BATCH.default, fusion: str | None = FUSION.default,
                 multilabel: bool = False):
        super().__init__(model)
        self.layers = _layer_names(model, layers)
        self.posts = dict(posts or {})
        self.mask_batch = MASK_BATCH.validate(mask_batch)  # None: from free memory
        self.fusion = FUSION.validate(self.default_fusion if fusion is None else str(fusion).lower())
        self.multilabel = multilabel
        self.last_selection: dict[str, torch.Tensor] = {}

    # --- channel filtering --------------------------------------------------------------------------
    def select_channels(self, significance: torch.Tensor) -> torch.Tensor:
        """(B, C) spatially averaged gradients -> (B, C) bool: the channels turned into masks (a > 0)."""
        return significance > 0

    @property
    def kept_counts(self) -> dict[str, torch.Tensor]:
        """Per layer, the (B,) number of channels the last :meth:`explain` selected."""
        return {name: keep.sum(dim=1) for name, keep in self.last_selection.items()}

    # --- the pipeline -------------------------------------------------------------------------------
    def _activations_and_significance(self, x, targets):
        for param in self.model.parameters():  # the template's restored_state restores the flags
            param.requires_grad_(False)       # only the block-end activations need gradients (see computing())
        layers = {name: self.model.get_submodule(name) for name in self.layers}
        with torch.enable_grad(), LayerCapture(layers, self.posts) as capture:
            logits = capture.forward(self.model, x)
            order = [name for name, _ in capture.records]
            acts = [act for _, act in capture.records]
            for name, act in capture.records:
                if act.dim() != 4:
                    raise RuntimeError(f"layer '{name}' does not return a (B, C, h, w) tensor")
            # the gradient of log P_k: the sign and normalised values of dP_k/dA without P_k's underflow
            log_probs = target_log_probabilities(logits, targets, self.multilabel)
            grads = torch.autograd.grad(log_probs.sum(), acts, allow_unused=True)
        significance = [torch.zeros(a.shape[:2], device=a.device) if g is None else g.float().mean(dim=(2, 3))
                        for a, g in zip(acts, grads, strict=True)]
        return order, [a.detach() for a in acts], significance, logits.detach()

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        order, acts, significance, logits = self._activations_and_significance(x, targets)
        selection, pairs = {}, []
        for name, act, sig in zip(order, acts, significance, strict=True):
            keep = self.select_channels(sig)
            selection[name] = keep
            flat = act.flatten(2)
            usable = keep & _varies(flat.amin(dim=2), flat.amax(dim=2))  # constant channels: no mask
            pairs.append(usable.nonzero())                                 # (N, 2) image, channel
        self.last_selection = selection
        mask_batch = self.mask_batch or batch_for_memory(self.model, tuple(x.shape[-2:]), x.device,
                                                         gradients=False)
        masks = sum(len(p) for p in pairs)
        with torch.no_grad(), tqdm(total=masks, desc=self.progress_desc, leave=False, disable=None) as bar:
            layer_maps = [self._layer_map(x, act, index, targets, bar, mask_batch)
                          for act, index in zip(acts, pairs, strict=True)]
        return Explanation(self._fuse(layer_maps)[:, None], logits)

    def _layer_map(self, x, act, index, targets, bar, mask_batch: int) -> torch.Tensor:
        """(B, H, W) visualization map V = sum_m s_m M_m (/ |M_m|) of one layer, not yet normalised."""
        batch, _, height, width = x.shape
        total = torch.zeros(batch, height, width, device=x.device, dtype=torch.float32)

        def score(start: int, stop: int) -> None:  # the chunk's sum is added only once its forward is done
            image, channel = index[start:stop].unbind(1)
            masks = F.interpolate(act[image, channel][:, None].float(), size=(height, width), mode="bilinear",
                                  align_corners=False)
            low = masks.amin(dim=(2, 3), keepdim=True)
            high = masks.amax(dim=(2, 3), keepdim=True)
            masks = (masks - low) / (high - low).clamp(min=torch.finfo(masks.dtype).tiny)
            scores = target_probabilities(self.model(x[image] * masks.to(x.dtype)), targets[image], self.multilabel)
            weights = scores
            if self.area_normalise:
                weights = scores / (masks.sum(dim=(1, 2, 3)) + 1e-6)
            total.index_add_(0, image, weights[:, None, None] * masks[:, 0])

        run_chunks(len(index), mask_batch, score, self.model, ("forward", (height, width), str(x.device)),
                   "SISE masked images", bar.update)
        return total

    def _fuse(self, layer_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Cascade E <- (E + V_l) G(V_l), shallow to deep, over each image's non-constant layer maps."""
        fused = torch.zeros_like(layer_maps[0])
        started = torch.zeros(fused.shape[0], dtype=torch.bool, device=fused.device)
        for raw in layer_maps:
            flat = raw.flatten(1)
            low, high = flat.amin(dim=1), flat.amax(dim=1)
            valid = _varies(low, high)
            span = torch.where(valid, high - low, torch.ones_like(high))
            normalised = torch.where(valid[:, None, None], (raw - low[:, None, None]) / span[:, None, None], 0)
            gate = self._gate(normalised)
            step = torch.where(started[:, None, None], (fused + normalised) * gate, normalised)
            fused = torch.where(valid[:, None, None], step, fused)
            started = started | valid
        return fused

    def _gate(self, maps: torch.Tensor) -> torch.Tensor:
        """G(V) for (B, H, W) maps in [0, 1]: Otsu-thresholded (hard) or Otsu-centred sigmoid (soft)."""
        levels = to_uint8(maps)
        # one host copy per layer, kept: OpenCV's Otsu is a sequential float64 recurrence; a device version
        # (bincount + cumsum) rounds differently, so near-tied thresholds are not guaranteed bitwise identical
        host = levels.flatten(1).cpu().numpy()
        thresholds = np.zeros(host.shape[0], dtype=np.float64)
        for row, data in enumerate(host):
            t = otsu_level(data)
            if self.fusion == "soft":
                raised = round(t * self.tau)
                t = t * self.tau if np.count_nonzero(data >= raised) < 0.1 * data.size else t
            thresholds[row] = t
        thr = torch.as_tensor(thresholds, device=maps.device, dtype=torch.float32)[:, None, None]
        if self.fusion == "hard":
            return (levels.float() > thr).float()
        return torch.sigmoid((maps - thr / 255) * self.temperature)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(layers={self.layers}, mask_batch={self.mask_batch}, "
                f"fusion={self.fusion!r})")


class AdaSISE(SISE):
    """Ada-SISE: SISE with the channels above the Otsu threshold of the max-normalised positive average
    gradients, plain score-weighted mask sums and hard Otsu fusion (its official code)."""

    name = "adasise"
    default_fusion = "hard"
    area_normalise = False
    progress_desc = "Ada-SISE masks"

    def select_channels(self, significance: torch.Tensor) -> torch.Tensor:
        positive = significance > 0
        top = significance.amax(dim=1, keepdim=True)
        normalised = significance / top.clamp(min=torch.finfo(significance.dtype).tiny)
        thresholds = otsu_thresholds(normalised, positive)
        thr = torch.as_tensor(thresholds, device=significance.device, dtype=torch.float32)[:, None]
        return (to_uint8(normalised).float() > thr) & positive


# ----------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------

def _layer_names(model: nn.Module, layers) -> list[str]:
    if isinstance(layers, str):
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    names = list(layers)
    if not names or not all(isinstance(name, str) for name in names):
        raise MethodError(f"layers must be a non-empty list of module names, got {layers!r}")
    if len(set(names)) != len(names):
        raise MethodError(f"layers has duplicates: {names}")
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise MethodError(f"layer '{name}' not found in the model") from None
    return names


def layer_posts(spec: ModelSpec, layers: Sequence[str]) -> dict[str, Post]:
    """Ops to apply to layer outputs: the spec's activation_post at its CAM layer, and DenseNet's ReLU
    (applied in ``forward``, after ``features``) at ``features.norm5`` / ``features``. A transformer's token
    layout (``spec.activation_post`` a :class:`~models.tokens.TokenLayout`) applies to every layer."""
    if isinstance(spec.activation_post, TokenLayout):
        return {name: spec.activation_post for name in layers}
    posts: dict[str, Post] = {}
    if spec.activation_post is not None and spec.target_layer in layers:
        posts[spec.target_layer] = spec.activation_post
    if isinstance(spec.model, DenseNet):
        for name in ("features.norm5", "features"):
            if name in layers:
                posts.setdefault(name, torch.relu)
    return posts


def _builder(cls):
    def build(spec: ModelSpec, layers: None | str | Sequence[str] = LAYERS.default, **options) -> SISE:
        layers = LAYERS.validate(layers)
        names = block_end_layers(spec.model, spec.input_size) if layers is None else _layer_names(spec.model, layers)
        return cls(spec.model, names, layer_posts(spec, names), multilabel=spec.multilabel, **options)
    build.__doc__ = (f"{cls.__name__} for ``spec``; options: mask_batch (default: from free memory), "
                     f"layers (block ends), "
                     f"fusion ('{cls.default_fusion}').")
    build.__name__ = build.__qualname__ = f"build_{cls.name}"
    return build


SISE_OPTIONS = (MASK_BATCH, FUSION, LAYERS)  # SISE and Ada-SISE
build_sise = _builder(SISE)
build_adasise = _builder(AdaSISE)

__all__ = ["AdaSISE", "SISE", "block_end_layers", "build_adasise", "build_sise",
           "layer_posts", "otsu_thresholds", "traced_block_ends"]
