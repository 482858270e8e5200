#!/usr/bin/env python
"""ROAD: per-image time of the metric (imputation included) against the no-grad forwards it needs.

    python benchmarks/road_speed.py                                   # CPU: lite0 and resnet50, 1 and 4 images
    python benchmarks/road_speed.py --models resnet50 --device cuda --images 1 32 --sizes 224 448

Per image the metric scores 2 K imputed images (MoRF and LeRF at K percentiles) and the image itself: one
no-grad forward of (2 K + 1) B images. Target (issue 23): at most 1.15 x that forward, imputation included.
The metric is also split into its imputation (sparse solves on the host) and the rest. Timed in interleaved
rounds (best of --repeats each).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, start, timed_together  # noqa: E402
from evaluation.road import (  # noqa: E402
    DEFAULT_PERCENTILES,
    ORDERS,
    RoadMetric,
    imputed_images,
    removal_orders,
    removed_count,
    solver_threads,
)


def smooth_maps(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Blob-shaped [0, 1] maps (a CAM's shape: the removed pixels form regions, not salt and pepper)."""
    low = torch.rand(batch, 1, 7, 7, generator=generator)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def peer_imputer(x: torch.Tensor, maps: torch.Tensor, percentiles) -> None:
    """pytorch-grad-cam's NoisyLinearImputer (the ROAD authors' code) on the same 2 K systems of each image."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    imputer = NoisyLinearImputer()
    pixels = x.shape[-2] * x.shape[-1]
    for image, saliency in zip(x.cpu(), maps.cpu(), strict=True):
        orders = removal_orders(saliency[None])
        for order in ORDERS:
            for p in percentiles:
                keep = torch.ones(pixels)
                keep[torch.from_numpy(orders[order][0, :removed_count(pixels, p)])] = 0
                imputer(image, keep.view(x.shape[-2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--images", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 112])
    parser.add_argument("--percentiles", nargs="+", type=float, default=list(DEFAULT_PERCENTILES))
    parser.add_argument("--peer", action="store_true",
                        help="also time pytorch-grad-cam's imputer on the same systems (B = 1; test-only peer)")
    add_run_flags(parser, repeats=2)
    args = parser.parse_args()
    run = start(args, f"per-image milliseconds, {len(args.percentiles)} percentiles, {solver_threads()} solver threads")
    device = run.device
    forwards_per_image = len(ORDERS) * len(args.percentiles) + 1
    metric = RoadMetric(args.percentiles)
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name)
        for size in args.sizes:
            for batch in args.images:
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(batch, 3, size, size, generator=generator).to(device)
                maps = smooth_maps(batch, size, generator).to(device)
                targets = torch.randint(0, spec.num_classes, (batch,), generator=generator).to(device)
                keys = [str(i) for i in range(batch)]

                def whole(model=spec.model, x=x, maps=maps, targets=targets, keys=keys):
                    with run.precision.autocast():
                        metric(model, x, maps, targets, keys=keys)

                def imputation(x=x, maps=maps, keys=keys):
                    imputed_images(x, maps, metric.percentiles, metric.noise, [[0, i] for i in range(len(keys))])

                def forwards(model=spec.model, x=x, batch=batch):
                    with torch.no_grad(), run.precision.autocast():
                        model(x.repeat(forwards_per_image, 1, 1, 1))

                def peer_imputation(x=x, maps=maps):
                    peer_imputer(x, maps, metric.percentiles)

                functions = {"metric": whole, "imputation": imputation, "forwards": forwards}
                if batch == 1 and args.peer:
                    functions["peer"] = peer_imputation
                times = timed_together(functions, device, args.repeats)
                print(f"{name} {size}px B={batch}: metric {1e3 * times['metric'] / batch:8.1f} ms (imputation "
                      f"{1e3 * times['imputation'] / batch:7.1f}) | no-grad forward of {forwards_per_image}B "
                      f"images {1e3 * times['forwards'] / batch:7.1f} ms | {times['metric'] / times['forwards']:.2f} x"
                      f" | without the imputation {(times['metric'] - times['imputation']) / times['forwards']:.2f} x"
                      + (f" | pytorch-grad-cam's imputer on the same systems {1e3 * times['peer']:7.1f} ms"
                         if "peer" in times else ""))
        print(f"{name}: {clock.split()}")


if __name__ == "__main__":
    main()
