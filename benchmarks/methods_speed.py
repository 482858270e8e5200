#!/usr/bin/env python
"""Per-image time of every explainer next to one forward+backward, alone and (optionally) through UCAG.

    python benchmarks/methods_speed.py                                   # CPU defaults: 2 images, lite0
    python benchmarks/methods_speed.py --models resnet50 --device cuda --images 8 --ucag

Methods that score masked copies (scorecam, rise, sise, adasise) and multi-pass methods (igcam, cameras)
cost many forwards by design; the table gives that count beside the time so the two can be compared.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, forward_backward_once, start, timed  # noqa: E402
from methods import build_explainer  # noqa: E402
from ucag import UCAG  # noqa: E402

METHODS = ["gradcam", "wgradcam", "gradient", "guided", "deconv", "fullgrad", "igcam", "cameras", "scorecam",
           "rise", "sise", "adasise", "mwp", "cmwp", "normgrad"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--masks", type=int, default=4000, help="RISE masks (paper: 4000)")
    parser.add_argument("--mask-batch", type=int, default=64)
    parser.add_argument("--ucag", action="store_true", help="also time each method through UCAG")
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("-a", "--alpha", type=float, default=1.3)
    add_run_flags(parser, repeats=1)
    args = parser.parse_args()
    run = start(args, f"{args.images} images of {args.size} px; per-image seconds" +
                (f"; UCAG n={args.n}, alpha={args.alpha}" if args.ucag else ""))
    device = run.device
    options = {"scorecam": {"mask_batch": args.mask_batch}, "sise": {"mask_batch": args.mask_batch},
               "adasise": {"mask_batch": args.mask_batch},
               "rise": {"n_masks": args.masks, "mask_batch": args.mask_batch}}
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name)
        x = torch.randn(args.images, 3, args.size, args.size, device=device)

        def in_precision(fn, *fn_args):
            def call():
                with run.precision.autocast():
                    fn(*fn_args)
            return call

        reference = timed(in_precision(forward_backward_once, spec.model, x), device, args.repeats) / args.images
        batch = x[:1].expand(args.mask_batch, -1, -1, -1).contiguous()
        with torch.no_grad():
            scored = timed(in_precision(spec.model, batch), device, args.repeats) / args.mask_batch
        print(f"{name}: forward+backward {1000 * reference:.1f} ms; one no-grad forward in a batch of "
              f"{args.mask_batch}: {1000 * scored:.1f} ms (the unit cost of the masked-input methods)")
        for method in args.methods:
            explainer = build_explainer(method, spec, **options.get(method, {}))
            alone = timed(in_precision(explainer, x), device, args.repeats) / args.images
            line = f"  {method:<9} {alone:8.3f} s ({alone / reference:7.1f} x fwd+bwd)"
            if args.ucag:
                wrapped = UCAG(explainer, n=args.n, alpha=args.alpha)
                line += f" | with UCAG {timed(in_precision(wrapped, x), device, 1) / args.images:8.2f} s"
            print(line, flush=True)
        print(f"{name}: {clock.split()}", flush=True)


if __name__ == "__main__":
    main()
