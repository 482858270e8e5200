"""Flags every script shares (model, method, UCAG geometry, device, batching, output) and their checks."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.allocator import keep_freed_memory
from common.determinism import explain_refusal, make_deterministic
from common.errors import ToolkitError
from common.precision import PRECISIONS, Precision
from evaluation.driver import Row
from methods import Explainer, build_explainer, canonical_name, method_options
from methods.registry import declared_options
from models import DEFAULT_MODEL, ModelSpec, load_model
from ucag import UCAG, UpscaledInput
from ucag.blending import BLENDS, SIGMA_FRACTION
from ucag.geometry import REFERENCE_SIDE, PatchGrid

# Decoding processes on a GPU run. On a CPU they take cores from the model and every page the main process
# writes after forking them is copied once: 8 photos, 2 cores, UCAG(Grad-CAM): 629 ms per image with 2, 512 with 0.
DEFAULT_WORKERS = 2

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

# The largest side of an upscaled crop (alpha * crop): beyond it one crop's activations outgrow any device.
MAX_SCALED_SIDE = 4096


class UsageError(ToolkitError):
    """A flag value the scripts refuse (checked here, before any library code runs)."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_common_flags(parser: argparse.ArgumentParser, default_batch: int = 8) -> None:
    parser.add_argument("method", help="explainer name, e.g. gradcam, gradcam++, xgradcam, layercam")
    model = parser.add_argument_group("model")
    model.add_argument("--name", default=DEFAULT_MODEL,
                       help=f"model name (default {DEFAULT_MODEL}, embedded, offline); resnet50, vgg16, vgg19, "
                            "densenet121, inception_v3 or any torchvision classifier; or timm:<name>, e.g. "
                            "timm:vit_base_patch16_224.augreg_in21k_ft_in1k, timm:swin_tiny_patch4_window7_224")
    model.add_argument("--weights", default="default",
                       help="'default' (embedded; torchvision IMAGENET1K_V1 from the torch hub cache or downloaded; "
                            "timm: the pretrained file from the local Hugging Face / torch hub cache, never "
                            "downloaded), 'random', or PATH to a state_dict (.pth, .bin, or .safetensors for timm)")
    model.add_argument("--target-layer", default=None, help="CAM layer (dotted module name) instead of the default")
    ucag = parser.add_argument_group("UCAG (paper symbols in brackets)")
    ucag.add_argument("--ucag", action="store_true", help="also compute the UCAG version of the method")
    ucag.add_argument("-a", "--alpha", type=float, default=2.6, help="[alpha] crop upscaling factor (default 2.6)")
    ucag.add_argument("-c", "--crop-size", type=float, default=124,
                      help="[rho*224] crop side in the 224-px frame (default 124, rho=0.555)")
    ucag.add_argument("-n", "--num-patches", type=int, default=6, help="[n] crops per side, n*n in all (default 6)")
    ucag.add_argument("--patch-batch", type=int, default=None,
                      help="crops explained per forward/backward (default: as many as half the device's free "
                           "memory holds, at most 8 on a CPU and 1024 on a GPU)")
    ucag.add_argument("--no-confidence", action="store_true",
                      help="uniform crop weights instead of Y = exp(softmax) (Eq. 4)")
    ucag.add_argument("--official", action="store_true",
                      help="official code's quirks: divide by Gamma+1, blur the final map, no confidence "
                           "weighting unless --score")
    ucag.add_argument("--score", action="store_true", help="with --official: weight crops by confidence")
    ucag.add_argument("--blend", choices=BLENDS, default=None,
                      help="[V(., Gamma)] how overlapping crop maps are joined: 'constant' (the paper's sum / "
                           "Gamma, default; the map shows the crop grid) or 'gaussian' (each crop map weighted by a "
                           f"Gaussian window, sigma = {SIGMA_FRACTION:g} of the crop side, sum / summed windows: no "
                           "grid; not with --official)")
    options = parser.add_argument_group("method options (each used by the methods named)")
    for option, methods in declared_options().items():
        options.add_argument(option.flag, type=option.type, nargs=option.nargs, default=None,
                             help=f"{', '.join(methods)}: {option.help} (default {option.default_text()})")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--precision", choices=PRECISIONS, default="fp32",
                     help="fp32 (default, the paper's numbers; TF32 off on CUDA), tf32 (CUDA tensor cores for "
                          "float32 products) or bf16 (bfloat16 autocast; relevance methods stay float32)")
    run.add_argument("--memory-format", choices=MEMORY_FORMATS, default=None,
                     help="layout of the model's 4-D weights and activations (default: the method's own choice, "
                          "channels_last, 1.3-1.4 x faster convolutions measured on a CPU, except contiguous "
                          "for the relevance methods, whose own convolutions run faster so)")
    run.add_argument("--deterministic", action="store_true",
                     help="bit-identical numbers run after run: PyTorch's deterministic kernels (an op without one "
                          "is refused), cuDNN autotuning off, CUBLAS_WORKSPACE_CONFIG=:4096:8; slower on a GPU")
    run.add_argument("--batch-size", type=int, default=default_batch,
                     help=f"images per batch (default {default_batch})")
    run.add_argument("--workers", type=int, default=None,
                     help="image-decoding worker processes (default: 2 on a GPU; 0 on a CPU, where they compete "
                          "with the model for the same cores)")


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the dataset evaluation scripts (insdel.py, density.py)."""
    data = parser.add_argument_group("data")
    data.add_argument("--img-path", required=True,
                      help="ImageNet val class folders, a flat folder (+ --labels), or any folder of images")
    data.add_argument("--labels", default=None,
                      help="labels for a flat folder: devkit ILSVRC2012_validation_ground_truth.txt (meta.mat "
                           "beside it), a text file with one class index or wnid per image (sorted order) or of "
                           "'name label' lines, or a CSV file,label")
    data.add_argument("--target", choices=["gt", "pred"], default=None,
                      help="class to explain: ground truth (default when labels exist) or the prediction")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    data.add_argument("--out", default=None,
                      help="output folder (default results/<script>/<model>_<method>[_ucag]); a rerun with the "
                           "same folder resumes")


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


def check_geometry(args: argparse.Namespace, spec: ModelSpec) -> None:
    """n >= 2, alpha > 0, 0 < c <= 224, and scaled crops neither too small for the model nor above
    MAX_SCALED_SIDE (not checked for a fixed-input model, whose crops are resized to its input size)."""
    if args.num_patches < 2:
        raise UsageError(f"-n/--num-patches must be at least 2 (got {args.num_patches})")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise UsageError(f"-a/--alpha must be positive and finite (got {args.alpha})")
    if not 0 < args.crop_size <= REFERENCE_SIDE:
        raise UsageError(f"-c/--crop-size must be in (0, {REFERENCE_SIDE}] (the crop side in the 224-px frame), "
                        f"got {args.crop_size}")
    if args.patch_batch is not None and args.patch_batch < 1:
        raise UsageError(f"--patch-batch must be at least 1 (got {args.patch_batch})")
    try:
        grid = PatchGrid(*spec.input_size, crop=args.crop_size, n=args.num_patches)
    except ValueError as exc:  # c too small for the model's input: an empty crop
        raise UsageError(f"-c/--crop-size: {exc}") from None
    if spec.fixed_input:
        return  # its crops are resized to its input size (fixed_crop_input): alpha sets no crop size to check
    side = min(int(grid.crop_size[0] * args.alpha), int(grid.crop_size[1] * args.alpha))
    largest = max(int(grid.crop_size[0] * args.alpha), int(grid.crop_size[1] * args.alpha))
    if largest > MAX_SCALED_SIDE:
        raise UsageError(f"crops of {grid.crop_size[0]}x{grid.crop_size[1]} px scaled by alpha={args.alpha:g} would "
                         f"be {largest} px, above the {MAX_SCALED_SIDE} px limit; lower -a or -c")
    if side < spec.min_side:
        raise UsageError(f"crops of {grid.crop_size[0]}x{grid.crop_size[1]} px scaled by alpha={args.alpha} are "
                        f"{side} px, below the {spec.min_side} px {spec.name} accepts; raise -c or -a")


def fixed_crop_input(args: argparse.Namespace, spec: ModelSpec) -> tuple[int, int] | None:
    """The model's own input size when it takes no other (``spec.fixed_input``: a ViT without
    position-embedding interpolation): UCAG's crops are then resized to it instead of by alpha, with a warning
    that says so; None for every model that takes alpha * c crops."""
    if not spec.fixed_input:
        return None
    grid = PatchGrid(*spec.input_size, crop=args.crop_size, n=args.num_patches)
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

    def rows(self, center: bool = False) -> list[Row]:
        """The table's rows: (center baseline,) the method, the method with UCAG ('name*')."""
        rows = [Row("center", build_explainer("center", self.spec))] if center and self.method != "center" else []
        rows.append(Row(self.method, self.explainer))
        if self.ucag is not None:
            rows.append(Row(f"{self.method}*", self.ucag, ucag=True))
        return rows

    def settings(self) -> dict:
        """Model, method and UCAG settings the numbers depend on (recorded in run.json)."""
        return dict(self.settings_recorded)


def build_setup(args: argparse.Namespace, load_spec: Callable[[torch.device], ModelSpec] | None = None) -> Setup:
    """Check the flags, then build device, model, explainer and (with --ucag) its UCAG wrapper.

    load_spec: builds the model for the device instead of the ImageNet registry (pointing-game models).
    """
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {args.batch_size})")
    blend = getattr(args, "blend", None) or "constant"
    if args.official and blend != "constant":
        raise UsageError(f"--blend {blend} is not the official code's fold: drop --official or --blend")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more (got {args.workers})")
    method = canonical_name(args.method)
    if getattr(args, "deterministic", False):
        make_deterministic()  # before the model's first CUDA product: cuBLAS reads its setting then
    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = DEFAULT_WORKERS if device.type == "cuda" else 0
    precision = Precision(getattr(args, "precision", "fp32"), device)
    precision.apply()
    spec = load_spec(device) if load_spec else load_model(args.name, args.weights, device, args.target_layer)
    check_geometry(args, spec)
    options = explainer_options(args, method)
    explainer = build_explainer(method, spec, **options)
    spec.model.to(memory_format=MEMORY_FORMATS[getattr(args, "memory_format", None) or explainer.memory_format])
    settings = {"model": spec.name, "weights": spec.weights, "layer": spec.target_layer, "method": method,
                "method_options": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(options.items())},
                "official": args.official}
    if spec.timm_model:  # the pretrained tag timm resolved a bare name to (it may change with timm)
        settings["timm_model"] = spec.timm_model
    baseline = explainer
    if args.official and args.alpha != 1:
        baseline = UpscaledInput(explainer, args.alpha)
        settings["baseline_alpha"] = args.alpha
    wrapped = None
    if args.ucag:
        confidence = (False if args.no_confidence else None) if not args.official else bool(args.score)
        crop_input = fixed_crop_input(args, spec)
        wrapped = UCAG(explainer, crop=args.crop_size, n=args.num_patches, alpha=args.alpha,
                       patch_batch=args.patch_batch, confidence=confidence, official=args.official,
                       multilabel=spec.multilabel, blend=blend, crop_input=crop_input)
        settings.update({"ucag": True, "alpha": args.alpha, "crop": args.crop_size, "n": args.num_patches,
                         "confidence": wrapped.confidence, "blend": blend})
        if crop_input is not None:
            settings["crop_input"] = list(crop_input)
    else:
        settings["ucag"] = False
        if getattr(args, "blend", None):
            warnings.warn("--blend has no effect without --ucag", stacklevel=2)
    return Setup(device, spec, method, baseline, wrapped, settings, precision)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class Terminated(BaseException):
    """SIGTERM, raised in the main process like KeyboardInterrupt on Ctrl-C, so that the run unwinds: records
    written so far are kept, DataLoader workers are shut down, the exit code is 143 (128 + SIGTERM)."""


def _on_sigterm(main_pid: int) -> Callable:
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if os.getpid() != main_pid:  # a forked child that inherited the handler: end as SIGTERM does
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated
    return handler


def _escape_unencodable_output() -> None:
    """A file name that is not valid UTF-8 printed to stdout is escaped instead of ending the run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str = "ucag") -> None:
    """Run a script's ``main``: user errors become one stderr line and exit code 2; Ctrl-C exits 130 and
    SIGTERM 143, both after unwinding (records kept, worker processes shut down)."""
    warnings.formatwarning = _format_warning
    _escape_unencodable_output()
    keep_freed_memory()  # CPU batches reuse freed buffers instead of faulting them in again (common.allocator)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid())) if in_main_thread else None
    try:
        code = main(argv)
    except ToolkitError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as exc:  # --deterministic met an op without a deterministic kernel
        refusal = explain_refusal(exc)
        if refusal is None:
            raise
        print(f"{prog}: error: {refusal}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        sys.exit(143)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    sys.exit(code or 0)
