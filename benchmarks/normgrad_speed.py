#!/usr/bin/env python
"""NormGrad against one forward+backward: per-image time of each variant at the CAM layer (conv: the last
convolution before it) on VGG16 and ResNet50 (random weights), 1 and 8 images of 224 px.

    python benchmarks/normgrad_speed.py                          # CPU
    python benchmarks/normgrad_speed.py --device cuda --repeats 5

NormGrad is one forward and one backward from the layer on (the layers before it build no graph), so it
should cost at most about a forward+backward to the input.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, forward_backward_once, start, timed_together  # noqa: E402
from methods import build_explainer  # noqa: E402

CONV_LAYERS = {"vgg16": "features.28", "resnet50": "layer4.2.conv3"}  # the convolution that ends the CAM layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--variants", nargs="+", default=["identity", "selective", "conv"])
    add_run_flags(parser, repeats=2)
    args = parser.parse_args()
    run = start(args, f"{' and '.join(map(str, args.images))} images of {args.size} px; per-image ms")
    device = run.device
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name, "random")
        explainers = {variant: build_explainer("normgrad", spec.with_layer(CONV_LAYERS[name]) if variant == "conv"
                                               and name in CONV_LAYERS else spec, normgrad_variant=variant)
                      for variant in args.variants}
        for images in args.images:
            x = torch.randn(images, 3, args.size, args.size, device=device)
            targets = torch.arange(images, device=device)
            calls = {"forward+backward": partial(forward_backward_once, spec.model, x)}
            for variant, explainer in explainers.items():
                calls[variant] = partial(explainer, x, targets)

            def in_precision(fn):
                def call():
                    with run.precision.autocast():
                        fn()
                return call

            times = timed_together({key: in_precision(fn) for key, fn in calls.items()}, device, args.repeats)
            reference = times.pop("forward+backward")
            line = f"{name} x{images}: forward+backward {1000 * reference / images:7.1f} ms"
            for variant, seconds in times.items():
                line += f" | {variant} {1000 * seconds / images:7.1f} ms ({seconds / reference:4.2f} x)"
            print(line, flush=True)
        print(f"{name}: {clock.split()}", flush=True)


if __name__ == "__main__":
    main()
