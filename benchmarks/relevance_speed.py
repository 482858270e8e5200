#!/usr/bin/env python
"""Relevance methods against one forward+backward: per-image time of each method on VGG16 and ResNet50
(random weights) at 224 px, alone and through UCAG.

    python benchmarks/relevance_speed.py                       # CPU: UCAG with n=3, alpha=1.3 to stay short
    python benchmarks/relevance_speed.py --device cuda -n 6 -a 2.6 --images 8

Target: each relevance method <= 3 x a forward+backward.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cli import resolve_device  # noqa: E402
from benchmarks.ucag_speed import forward_backward_once, timed  # noqa: E402
from common.allocator import keep_freed_memory  # noqa: E402
from methods import build_explainer  # noqa: E402
from models import load_model  # noqa: E402
from ucag import UCAG  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=["lrp", "clrp", "sglrp", "rap", "rsp", "agf"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("-a", "--alpha", type=float, default=1.3)
    parser.add_argument("--no-ucag", action="store_true")
    args = parser.parse_args()
    print(f"allocator: {keep_freed_memory()} (UCAG_SYSTEM_MALLOC=1 measures the default)")
    device = resolve_device(args.device)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {device}; {args.images} images of 224 px; per-image times, best of "
          f"{args.repeats}; UCAG n={args.n}, alpha={args.alpha}")
    for name in args.models:
        torch.manual_seed(0)
        spec = load_model(name, "random", device)
        x = torch.randn(args.images, 3, 224, 224, device=device)

        forward_backward = partial(forward_backward_once, spec.model, x)

        reference = timed(forward_backward, device, args.repeats)
        print(f"{name}: forward+backward {1000 * reference / args.images:.1f} ms")
        for method in args.methods:
            explainer = build_explainer(method, spec)
            alone = timed(partial(explainer, x), device, args.repeats)
            # the machine's speed drifts on shared hosts: the ratio uses the reference timed right after
            reference = timed(forward_backward, device, args.repeats)
            line = f"  {method:<6} {1000 * alone / args.images:8.1f} ms ({alone / reference:4.2f} x fwd+bwd)"
            if not args.no_ucag:
                ucag = UCAG(explainer, n=args.n, alpha=args.alpha, patch_batch=16)
                through = timed(partial(ucag, x), device, 1)
                line += f" | with UCAG {through / args.images:7.2f} s"
            print(line)


if __name__ == "__main__":
    main()
