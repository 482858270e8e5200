#!/usr/bin/env python
"""Insertion + deletion games against their floor: per-image time of both games (perturbed images built on
the device, scored in no-grad batches) and of a plain no-grad forward of the same number of images in
the same batch size (the floor).

    python benchmarks/insdel_speed.py                          # embedded model + random resnet50
    python benchmarks/insdel_speed.py --device cuda --images 32 --score-batch 256

Target: both games <= 1.15 x floor.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cli import resolve_device  # noqa: E402
from benchmarks.ucag_speed import timed  # noqa: E402
from common.allocator import keep_freed_memory  # noqa: E402
from common.images import find_images, load_rgb  # noqa: E402
from evaluation.insertion_deletion import game_curves, num_points  # noqa: E402
from models import load_model, preprocess  # noqa: E402


def bench_model(name: str, args, device: torch.device) -> None:
    torch.manual_seed(0)
    spec = load_model(name, "default" if name == "efficientnet_lite0" else "random", device)
    photos = [load_rgb(p) for p in find_images(Path(__file__).resolve().parents[1] / "examples")]
    x = preprocess((photos * args.images)[:args.images], spec, device)
    saliency = torch.rand(x.shape[0], *x.shape[-2:], device=device)
    targets = torch.randint(0, 1000, (x.shape[0],), device=device)
    height, width = x.shape[-2:]
    total = 2 * x.shape[0] * num_points(height * width, args.step)
    floor_input = x[:1].expand(min(args.score_batch, total), -1, -1, -1).contiguous()

    def games():
        for mode in ("deletion", "insertion"):
            game_curves(spec.model, x, saliency, targets, mode, args.step, args.score_batch)

    @torch.no_grad()
    def floor():
        for start in range(0, total, args.score_batch):
            spec.model(floor_input[:min(args.score_batch, total - start)])

    games_s = timed(games, device, args.repeats)
    floor_s = timed(floor, device, args.repeats)
    per = lambda s: f"{1000 * s / args.images:8.1f} ms"  # noqa: E731
    print(f"{name:<20} {total // args.images} forwards/image | games {per(games_s)} | floor {per(floor_s)} "
          f"| games/floor {games_s / floor_s:5.2f} x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--step", type=int, default=224 * 8)
    parser.add_argument("--score-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"allocator: {keep_freed_memory()} (UCAG_SYSTEM_MALLOC=1 measures the default)")
    device = resolve_device(args.device)
    warnings.simplefilter("ignore")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {gpu}; step {args.step}, {args.images} images, score batch "
          f"{args.score_batch}; per-image times, best of {args.repeats}")
    for name in args.models:
        bench_model(name, args, device)


if __name__ == "__main__":
    main()
