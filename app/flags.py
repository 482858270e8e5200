"""The flags every script shares (model, method, UCAG geometry, device, batching, output) and the parser
that reports a bad one in one line; what the flags build is app.setup's."""
from __future__ import annotations

import argparse

import torch

from common.errors import ToolkitError
from common.precision import PRECISIONS
from methods.registry import declared_options
from models import DEFAULT_MODEL
from ucag.blending import BLENDS, SIGMA_FRACTION
from ucag.config import UCAGConfig

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


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
    ucag.add_argument("-a", "--alpha", type=float, default=UCAGConfig.alpha,
                      help=f"[alpha] crop upscaling factor (default {UCAGConfig.alpha:g})")
    ucag.add_argument("-c", "--crop-size", type=float, default=UCAGConfig.crop,
                      help=f"[rho*224] crop side in the 224-px frame (default {UCAGConfig.crop:g}, rho=0.555)")
    ucag.add_argument("-n", "--num-patches", type=int, default=UCAGConfig.n,
                      help=f"[n] crops per side, n*n in all (default {UCAGConfig.n})")
    ucag.add_argument("--patch-batch", type=int, default=None,
                      help="crops explained per forward/backward (default: as many as half the device's free "
                           "memory holds, at most 8 on a CPU and 1024 on a GPU)")
    ucag.add_argument("--no-confidence", action="store_true",
                      help="uniform crop weights instead of Y = exp(softmax) (Eq. 4)")
    ucag.add_argument("--official", action="store_true",
                      help="official code's quirks: divide by Gamma+1, blur the final map, no confidence "
                           "weighting unless --score")
    ucag.add_argument("--score", action="store_true", help="with --official: weight crops by confidence")
    ucag.add_argument("--input-scale", type=float, default=1.0, metavar="S",
                      help="the base row explains the whole image upscaled by S (bicubic, as UCAG's crops): the "
                           "paper's plain-upscaling rows and Figure 2's resolutions (S = 1, 324/224, ..., 924/224); "
                           "default 1, the image as the model takes it; the UCAG row is unchanged; not with "
                           "--official and -a != 1, whose base row is already upscaled by alpha")
    ucag.add_argument("--blend", choices=BLENDS, default=None,
                      help="[V(., Gamma)] how overlapping crop maps are joined: 'constant' (the paper's sum / "
                           "Gamma, default; the map shows the crop grid) or 'gaussian' (each crop map weighted by a "
                           f"Gaussian window, sigma = {SIGMA_FRACTION:g} of the crop side, sum / summed windows: no "
                           "grid; not with --official)")
    options = parser.add_argument_group("method options (each used by the methods named)")
    for option, methods in declared_options().items():
        options.add_argument(option.flag, type=option.type, nargs=option.nargs, default=None,
                             help=f"{', '.join(methods)}: {option.help} (default {option.default_text()})")
    options.add_argument("--smooth", default=None, metavar="SPEC",
                         help="smooth the method (UCAG then smooths every crop's map): noise:N,SIGMA (SmoothGrad: "
                              "the mean map of N copies with Gaussian noise, sigma = SIGMA x the image's range) or "
                              "tta:FLIPS,SCALES (the mean map over flips none|h|hv and input scales like 1/1.25)")
    options.add_argument("--smooth-seed", type=int, default=0, help="seed of --smooth noise's noise (default 0)")
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


