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
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, forward_backward_once, start, timed  # noqa: E402
from methods import build_explainer  # noqa: E402
from ucag import UCAG  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=["lrp", "clrp", "sglrp", "rap", "rsp", "agf"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("-a", "--alpha", type=float, default=1.3)
    parser.add_argument("--no-ucag", action="store_true")
    add_run_flags(parser, repeats=2)
    args = parser.parse_args()
    run = start(args, f"{args.images} images of 224 px; per-image times; UCAG n={args.n}, alpha={args.alpha}",
                memory_format="contiguous")
    device = run.device
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name, "random")
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
                ucag = UCAG(explainer, n=args.n, alpha=args.alpha)
                through = timed(partial(ucag, x), device, 1)
                line += f" | with UCAG {through / args.images:7.2f} s"
            print(line, flush=True)
        print(f"{name}: {clock.split()}", flush=True)


if __name__ == "__main__":
    main()
