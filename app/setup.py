"""What the common flags build: the device, the model, the explainer, its UCAG wrapper and the settings
recorded in run.json. UCAG's own checks are the library's (ucag.config, ucag.protocol), worded here with
the flags; only what depends on the model is checked here (crops too small for it, above the pixel cap)."""
from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from app.flags import MEMORY_FORMATS, UsageError
from common.determinism import make_deterministic
from common.precision import Precision
from evaluation.rows import Row
from methods import Explainer, build_explainer, canonical_name, method_options
from methods.adapters import GRADCAM_LIB_PREFIX, captum_version, gradcam_lib_version
from methods.registry import CAPTUM_PREFIX, declared_options
from methods.smoothing import smoothed
from models import ModelSpec, load_model
from ucag import UCAG, UpscaledInput
from ucag.config import UCAGConfig
from ucag.errors import BlendRefused, SettingError, UCAGError
from ucag.geometry import CropGrid
from ucag.protocol import protocol_for

# Decoding processes on a GPU run. On a CPU they take cores from the model and every page the main process
# writes after forking them is copied once: 8 photos, 2 cores, UCAG(Grad-CAM): 629 ms per image with 2, 512 with 0.
DEFAULT_WORKERS = 2

# The largest side of an upscaled crop (alpha * crop): beyond it one crop's activations outgrow any device.
MAX_SCALED_SIDE = 4096


def resolve_device(name: str | None) -> torch.device:
    """The device to run on; a CUDA request without a usable GPU is a user error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} requested but no CUDA GPU is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name} requested but Apple's MPS backend is not available here "
                             "(use --device cpu)")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{name}' (use cpu, cuda or cuda:N)")
    return device


# The flag of each UCAG setting: the library's refusals (ucag.errors.SettingError) worded with it.
UCAG_FLAGS = {"crop": "-c/--crop-size", "n": "-n/--num-patches", "alpha": "-a/--alpha",
              "patch_batch": "--patch-batch", "blend": "--blend"}


def ucag_config(args: argparse.Namespace) -> UCAGConfig:
    """The flags' UCAG settings, checked by the library (ucag.config); a refusal names the flag.

    Confidence: the protocol's default (paper: on; --official: off), flipped by the flag that negates it
    (--no-confidence for a default on, --score for a default off)."""
    protocol = protocol_for(bool(getattr(args, "official", False)))
    switched = getattr(args, "no_confidence", False) if protocol.confidence_default else getattr(args, "score", False)
    try:
        return UCAGConfig(crop=args.crop_size, n=args.num_patches, alpha=args.alpha,
                          blend=getattr(args, "blend", None) or "constant",
                          confidence=protocol.confidence_default != bool(switched),
                          patch_batch=args.patch_batch, protocol=protocol)
    except SettingError as exc:
        flag = UCAG_FLAGS.get(exc.setting, exc.setting)
        raise UsageError(f"{flag} must be {exc.requirement} (got {exc.value!r})") from None
    except BlendRefused as exc:
        raise UsageError(f"--blend {exc.blend} is not the {exc.protocol} code's fold: drop --official "
                         "or --blend") from None


def input_scale(args: argparse.Namespace, config: UCAGConfig) -> float:
    """--input-scale S (the base row's upscaling of the whole image): finite and > 0; not with --official and
    alpha != 1, whose base row is the image upscaled by alpha already. 1 for callers without the flag."""
    scale = getattr(args, "input_scale", 1.0)
    if scale is None:
        return 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"--input-scale must be positive and finite (got {scale:g})")
    if scale != 1 and config.protocol.baseline_is_upscaled(config.alpha):
        raise UsageError(f"--input-scale {scale:g} with --official and -a {config.alpha:g}: the official base row "
                         "is already the image upscaled by alpha; drop --input-scale or --official")
    return float(scale)


def check_input_scale(scale: float, spec: ModelSpec) -> None:
    """The upscaled whole image of --input-scale: a size the model takes, within MAX_SCALED_SIDE."""
    if spec.fixed_input:
        raise UsageError(f"--input-scale {scale:g}: {spec.name} takes {spec.input_size[0]}x{spec.input_size[1]} inputs "
                         "only; drop --input-scale")
    sides = [int(side * scale) for side in spec.input_size]
    if max(sides) > MAX_SCALED_SIDE:
        raise UsageError(f"--input-scale {scale:g} would make the image {sides[1]}x{sides[0]} px, above the "
                         f"{MAX_SCALED_SIDE} px limit; lower --input-scale")
    if min(sides) < spec.min_side:
        raise UsageError(f"--input-scale {scale:g} would make the image {sides[1]}x{sides[0]} px, below the "
                         f"{spec.min_side} px {spec.name} accepts; raise --input-scale")


def check_geometry(args: argparse.Namespace, spec: ModelSpec) -> UCAGConfig:
    """The flags' UCAGConfig (:func:`ucag_config`), after the checks that depend on the model: crops that are
    not empty on its input, and scaled crops neither too small for it nor above MAX_SCALED_SIDE (not checked
    for a fixed-input model, whose crops are resized to its input size)."""
    config = ucag_config(args)
    try:
        grid = CropGrid(*spec.input_size, crop=config.crop, n=config.n)
    except UCAGError as exc:  # c too small for the model's input: an empty crop
        raise UsageError(f"-c/--crop-size: {exc}") from None
    if spec.fixed_input:
        return config  # its crops are resized to its input size (fixed_crop_input): alpha sets no crop size to check
    side = min(int(grid.crop_size[0] * args.alpha), int(grid.crop_size[1] * args.alpha))
    largest = max(int(grid.crop_size[0] * args.alpha), int(grid.crop_size[1] * args.alpha))
    if largest > MAX_SCALED_SIDE:
        raise UsageError(f"crops of {grid.crop_size[0]}x{grid.crop_size[1]} px scaled by alpha={args.alpha:g} would "
                         f"be {largest} px, above the {MAX_SCALED_SIDE} px limit; lower -a or -c")
    if side < spec.min_side:
        raise UsageError(f"crops of {grid.crop_size[0]}x{grid.crop_size[1]} px scaled by alpha={args.alpha} are "
                        f"{side} px, below the {spec.min_side} px {spec.name} accepts; raise -c or -a")
    return config


def fixed_crop_input(args: argparse.Namespace, spec: ModelSpec) -> tuple[int, int] | None:
    """The model's own input size when it takes no other (``spec.fixed_input``: a ViT without
    position-embedding interpolation): UCAG's crops are then resized to it instead of by alpha, with a warning
    that says so; None for every model that takes alpha * c crops."""
    if not spec.fixed_input:
        return None
    grid = CropGrid(*spec.input_size, crop=args.crop_size, n=args.num_patches)
    height, width = spec.input_size
    warnings.warn(f"{spec.name} takes {height}x{width} inputs only: UCAG's crops are resized to {height}x{width} "
                  f"instead of alpha * crop = {int(grid.crop_size[0] * args.alpha)}x"
                  f"{int(grid.crop_size[1] * args.alpha)} (-a/--alpha has no effect)", stacklevel=2)
    return height, width


def parse_target(text: str, spec: ModelSpec) -> int | None:
    """'pred' -> None (explain the prediction); an integer class index, checked against the classes."""
    if text == "pred":
        return None
    try:
        index = int(text)
    except ValueError:
        raise UsageError(f"--target must be 'pred' or a class index, got '{text}'") from None
    if not 0 <= index < spec.num_classes:
        raise UsageError(f"--target {index} is out of range: {spec.name} has classes 0..{spec.num_classes - 1}")
    return index


def explainer_options(args: argparse.Namespace, method: str) -> dict:
    """The declared options given on the command line for ``method``; a flag the method does not take
    gets a warning, not silence."""
    accepted = method_options(method)
    chosen = {}
    for option in declared_options():
        value = getattr(args, option.dest, None)
        if value is None:
            continue
        if option.name in accepted:
            chosen[option.name] = option.from_flag(value)
        else:
            warnings.warn(f"{option.flag} has no effect on {method}", stacklevel=2)
    return chosen


@dataclass
class Setup:
    """What a script builds from the common flags.

    explainer: the baseline row's explainer. Under --official with alpha != 1 it is the method on the whole
    image upscaled by alpha (the official code's baseline); decided here once, so every script's baseline
    row, picture and table mean the same. ucag: the UCAG wrapper of the plain method (with --ucag).
    """

    device: torch.device
    spec: ModelSpec
    method: str
    explainer: Explainer
    ucag: UCAG | None
    settings_recorded: dict = field(default_factory=dict)
    precision: Precision = field(default_factory=Precision)
    input_scale: float = 1.0  # --input-scale: the base row explains the image upscaled by it

    def rows(self, center: bool = False) -> list[Row]:
        """The table's rows: (center baseline,) the method, the method with UCAG ('name*')."""
        rows = [Row("center", build_explainer("center", self.spec))] if center and self.method != "center" else []
        rows.append(Row(self.method, self.explainer))
        if self.ucag is not None:
            rows.append(Row(f"{self.method}*", self.ucag, ucag=True))
        return rows

    @property
    def file_label(self) -> str:
        """The method as part of a file or folder name ('captum:Saliency' -> 'captum-Saliency')."""
        return self.method.replace(":", "-")

    def settings(self) -> dict:
        """Model, method and UCAG settings the numbers depend on (recorded in run.json)."""
        return dict(self.settings_recorded)


def check_flags(args: argparse.Namespace) -> tuple[UCAGConfig, float]:
    """The common flags' own checks, before anything is built (a study checks every point's so): batch size,
    UCAG settings, --input-scale, workers. Returns the UCAG settings and the input scale."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    config = ucag_config(args)  # UCAG's flags refused before the model loads
    scale = input_scale(args, config)
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more (got {args.workers})")
    return config, scale


def build_setup(args: argparse.Namespace, load_spec: Callable[[torch.device], ModelSpec] | None = None) -> Setup:
    """Check the flags, then build device, model, explainer and (with --ucag) its UCAG wrapper.

    load_spec: builds the model for the device instead of the ImageNet registry (pointing-game models).
    """
    _, scale = check_flags(args)
    method = canonical_name(args.method)
    if getattr(args, "deterministic", False):
        make_deterministic()  # before the model's first CUDA product: cuBLAS reads its setting then
    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = DEFAULT_WORKERS if device.type == "cuda" else 0
    precision = Precision(getattr(args, "precision", "fp32"), device)
    precision.apply()
    spec = load_spec(device) if load_spec else load_model(args.name, args.weights, device, args.target_layer)
    config = check_geometry(args, spec)
    options = explainer_options(args, method)
    explainer = build_explainer(method, spec, **options)
    smooth = getattr(args, "smooth", None)
    if smooth is not None:
        explainer = smoothed(explainer, smooth, args.smooth_seed)
    spec.model.to(memory_format=MEMORY_FORMATS[getattr(args, "memory_format", None) or explainer.memory_format])
    settings = {"model": spec.name, "weights": spec.weights, "layer": spec.target_layer, "method": method,
                "method_options": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(options.items())},
                "official": config.official, "smooth": smooth,
                "smooth_seed": args.smooth_seed if smooth and smooth.startswith("noise") else None}
    if method.startswith(CAPTUM_PREFIX):  # an outside explainer's numbers may change with its version
        settings["captum_version"] = captum_version()
    if method.startswith(GRADCAM_LIB_PREFIX):
        settings["gradcam_lib_version"] = gradcam_lib_version()
    if spec.timm_model:  # the pretrained tag timm resolved a bare name to (it may change with timm)
        settings["timm_model"] = spec.timm_model
    baseline = explainer
    if config.protocol.baseline_is_upscaled(config.alpha):
        baseline = UpscaledInput(explainer, config.alpha)
        settings["baseline_alpha"] = args.alpha
    elif scale != 1:
        check_input_scale(scale, spec)
        baseline = UpscaledInput(explainer, scale)
    settings["input_scale"] = scale
    wrapped = None
    if args.ucag:
        crop_input = fixed_crop_input(args, spec)
        wrapped = UCAG(explainer, config=replace(config, multilabel=spec.multilabel, crop_input=crop_input))
        settings.update({"ucag": True, "alpha": args.alpha, "crop": args.crop_size, "n": args.num_patches,
                         "confidence": wrapped.confidence, "blend": wrapped.blend})
        if crop_input is not None:
            settings["crop_input"] = list(crop_input)
    else:
        settings["ucag"] = False
        if getattr(args, "blend", None):
            warnings.warn("--blend has no effect without --ucag", stacklevel=2)
    return Setup(device, spec, method, baseline, wrapped, settings, precision, scale)


