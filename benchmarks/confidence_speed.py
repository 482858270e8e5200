#!/usr/bin/env python
"""Average drop / increase in confidence: per-image time of the metric against the no-grad forwards it needs.

    python benchmarks/confidence_speed.py                            # CPU: lite0 and resnet50, 1 and 16 images
    python benchmarks/confidence_speed.py --models resnet50 --device cuda --images 1 64

The metric scores each image and its map-masked copy: one no-grad forward of 2B images. Target (issue 23): at
most 1.15 x that forward. The two are timed in interleaved rounds (best of --repeats each).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, start, timed_together  # noqa: E402
from evaluation.confidence_change import confidence_change  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    add_run_flags(parser, repeats=3)
    args = parser.parse_args()
    run = start(args, f"{args.size} px; per-image milliseconds")
    device = run.device
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name)
        for batch in args.images:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 3, args.size, args.size, generator=generator).to(device)
            maps = torch.rand(batch, 1, args.size, args.size, generator=generator).to(device)
            targets = torch.randint(0, spec.num_classes, (batch,), generator=generator).to(device)

            def metric(model=spec.model, x=x, maps=maps, targets=targets):
                with run.precision.autocast():
                    confidence_change(model, x, maps, targets)

            def forwards(model=spec.model, x=x):
                with torch.no_grad(), run.precision.autocast():
                    model(torch.cat([x, x]))

            times = timed_together({"metric": metric, "forwards": forwards}, device, args.repeats)
            print(f"{name} B={batch}: metric {1e3 * times['metric'] / batch:8.1f} ms | no-grad forward of 2B "
                  f"images {1e3 * times['forwards'] / batch:8.1f} ms | {times['metric'] / times['forwards']:.2f} x")
        print(f"{name}: {clock.split()}")


if __name__ == "__main__":
    main()
