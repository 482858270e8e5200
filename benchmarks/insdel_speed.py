#!/usr/bin/env python
"""Insertion + deletion games against their floor: per-image time of both games (perturbed images built on
the device, scored in no-grad batches) and of a plain no-grad forward of the same number of images in
the same batch size and memory format (the tuned floor).

    python benchmarks/insdel_speed.py                          # embedded model + random resnet50
    python benchmarks/insdel_speed.py --device cuda --images 32 --score-batch 256

Target: both games <= 1.10 x floor.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, Run, add_run_flags, start, timed  # noqa: E402
from common.images import find_images, load_rgb  # noqa: E402
from evaluation.insertion_deletion import game_curves, num_points  # noqa: E402
from methods.batching import batch_for_memory  # noqa: E402
from models import preprocess  # noqa: E402
from models.preprocessing import memory_format_of  # noqa: E402


def bench_model(name: str, args, run: Run) -> None:
    clock = CpuTime()
    spec = run.model(name)
    device = run.device
    photos = [load_rgb(p) for p in find_images(Path(__file__).resolve().parents[1] / "examples")]
    x = preprocess((photos * args.images)[:args.images], spec, device)
    saliency = torch.rand(x.shape[0], *x.shape[-2:], device=device)
    targets = torch.randint(0, 1000, (x.shape[0],), device=device)
    height, width = x.shape[-2:]
    score_batch = args.score_batch or batch_for_memory(spec.model, (height, width), device, gradients=False)
    total = 2 * x.shape[0] * num_points(height * width, args.step)
    floor_input = x[:1].expand(min(score_batch, total), -1, -1, -1).contiguous(
        memory_format=memory_format_of(spec.model))

    def games():
        with run.precision.autocast():
            for mode in ("deletion", "insertion"):
                game_curves(spec.model, x, saliency, targets, mode, args.step, score_batch)

    @torch.no_grad()
    def floor():
        with run.precision.autocast():
            for first in range(0, total, score_batch):
                spec.model(floor_input[:min(score_batch, total - first)])

    games_s = timed(games, device, args.repeats)
    floor_s = timed(floor, device, args.repeats)
    per = lambda s: f"{1000 * s / args.images:8.1f} ms"  # noqa: E731
    print(f"{name:<20} {total // args.images} forwards/image, score batch {score_batch} | games {per(games_s)} "
          f"| floor {per(floor_s)} | games/floor {games_s / floor_s:5.2f} x | images/s {args.images / games_s:6.2f} "
          f"| {clock.split()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--step", type=int, default=224 * 8)
    parser.add_argument("--score-batch", type=int, default=None, help="default: from free memory, as insdel.py")
    add_run_flags(parser, repeats=2)
    args = parser.parse_args()
    run = start(args, f"step {args.step}, {args.images} images; per-image times")
    for name in args.models:
        bench_model(name, args, run)


if __name__ == "__main__":
    main()
