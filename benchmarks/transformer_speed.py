#!/usr/bin/env python
"""Per-image time of each explainer on ViT-B/16 and Swin-T, alone and through UCAG, next to one
forward+backward of the model (random weights: no timm weights can be fetched here; time does not depend
on them).

    python benchmarks/transformer_speed.py                         # CPU: 1 image of 224 px, UCAG n=6, a=2.6
    python benchmarks/transformer_speed.py --device cuda --images 8

UCAG gives each crop to the model at alpha * crop (322 px for the defaults; timm's dynamic image size, the
patch embedding reading 320 of them): 36 crops of 400 patch tokens instead of one image of 196.
Methods a model cannot run (the class-token methods on Swin) are listed as such.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, forward_backward_once, start, timed  # noqa: E402
from methods import build_explainer  # noqa: E402
from methods.errors import MethodError  # noqa: E402
from ucag import UCAG  # noqa: E402

MODELS = ["timm:vit_base_patch16_224", "timm:swin_tiny_patch4_window7_224"]
METHODS = ["gradcam", "gradcam++", "layercam", "rollout", "gradrollout", "transformer_attribution", "cplrp"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--images", type=int, default=1, help="images per batch (default 1)")
    parser.add_argument("--no-ucag", action="store_true", help="time the methods alone only")
    parser.add_argument("-n", type=int, default=6)
    parser.add_argument("-a", "--alpha", type=float, default=2.6)
    parser.add_argument("-c", "--crop", type=float, default=124)
    add_run_flags(parser, repeats=2)
    args = parser.parse_args()
    ucag_text = "" if args.no_ucag else f"; UCAG n={args.n}, alpha={args.alpha}, c={args.crop}"
    run = start(args, f"{args.images} image(s) of 224 px, random weights; per-image seconds{ucag_text}",
                memory_format="contiguous")
    device = run.device

    def in_precision(fn, *fn_args):
        def call():
            with run.precision.autocast():
                fn(*fn_args)
        return call

    for name in args.models:
        clock = CpuTime()
        spec = run.model(name, "random")
        x = torch.randn(args.images, 3, *spec.input_size, generator=torch.Generator().manual_seed(0)).to(device)
        reference = timed(in_precision(forward_backward_once, spec.model, x), device, args.repeats) / args.images
        print(f"{name} (layer {spec.target_layer}): forward+backward {reference:.3f} s per image", flush=True)
        for method in args.methods:
            try:
                explainer = build_explainer(method, spec)
            except MethodError as exc:
                print(f"  {method:<24} n/a ({exc})", flush=True)
                continue
            alone = timed(in_precision(explainer, x), device, args.repeats) / args.images
            line = f"  {method:<24} {alone:7.3f} s ({alone / reference:5.2f} x fwd+bwd)"
            if not args.no_ucag:
                wrapped = UCAG(explainer, crop=args.crop, n=args.n, alpha=args.alpha)
                seconds = timed(in_precision(wrapped, x), device, 1) / args.images
                line += f" | UCAG {seconds:7.2f} s ({seconds / reference:5.1f} x fwd+bwd)"
            print(line, flush=True)
        print(f"{name}: {clock.split()}", flush=True)


if __name__ == "__main__":
    main()
