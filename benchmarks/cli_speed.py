#!/usr/bin/env python
"""End-to-end speed of ``visualization.py gradcam --ucag``: per-image time over 8 photos, start-up
excluded, against UCAG's tuned floor (a no-grad forward of each image's n*n alpha-upscaled crops, in the
CLI's own chunk size and memory format).

    python benchmarks/cli_speed.py                     # embedded model, CPU or GPU
    python benchmarks/cli_speed.py --name resnet50 --weights random --device cuda

The script's time per image is (T(2 + N images) - T(2 images)) / N, each the best of --repeats runs of the
whole ``main`` (model loading, the decoding workers, which a single image does not start, and the output
folder are in both, so they cancel out).
Target: at most 1.25 x the floor.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visualization  # noqa: E402
from benchmarks.harness import CpuTime, add_run_flags, start, timed  # noqa: E402
from common.images import find_images, load_rgb  # noqa: E402
from methods.batching import batch_for_memory  # noqa: E402
from models import preprocess  # noqa: E402
from ucag.geometry import CropGrid  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def photo_folder(root: Path, count: int) -> Path:
    """A folder of ``count`` copies of the bundled photos under distinct names."""
    folder = root / f"photos_{count}"
    folder.mkdir()
    photos = find_images(EXAMPLES)
    for index in range(count):
        source = photos[index % len(photos)]
        shutil.copy(source, folder / f"{index:02d}_{source.name}")
    return folder


def best_run(argv: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        assert visualization.main(argv) == 0
        best = min(best, time.perf_counter() - begin)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--name", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="visualization.py's --batch-size (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="visualization.py's --workers (default: its own)")
    add_run_flags(parser, repeats=2)
    args = parser.parse_args()
    run = start(args, f"visualization.py {args.method} --ucag on {args.images} photos")
    clock = CpuTime()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        two, many = photo_folder(root, 2), photo_folder(root, 2 + args.images)
        common = [args.method, "--ucag", "--name", args.name, "--weights", args.weights, "--device",
                  str(run.device), "--precision", args.precision, "--memory-format", args.memory_format,
                  "--batch-size", str(args.batch_size)]
        common += [] if args.workers is None else ["--workers", str(args.workers)]
        startup = best_run(common + ["--img-path", str(two), "--out", str(root / "out_two")], args.repeats)
        whole = best_run(common + ["--img-path", str(many), "--out", str(root / "out_many")], args.repeats)
        per_image = (whole - startup) / args.images

        spec = run.model(args.name, args.weights)
        x = preprocess([load_rgb(p) for p in sorted(many.iterdir())[2:]], spec, run.device)
        grid = CropGrid(*x.shape[-2:], crop=124, n=6)
        scaled = (int(grid.crop_size[0] * 2.6), int(grid.crop_size[1] * 2.6))
        crops = F.interpolate(grid.unfold(x), size=scaled, mode="bicubic", align_corners=False)
        chunk = batch_for_memory(spec.model, scaled, run.device, gradients=True)

        @torch.no_grad()
        def floor():
            with run.precision.autocast():
                for first in range(0, crops.shape[0], chunk):
                    spec.model(crops[first:first + chunk])

        floor_s = timed(floor, run.device, args.repeats) / args.images
    print(f"{args.name:<20} start-up {startup:6.2f} s (2 images) | script {1000 * per_image:7.1f} ms/image | "
          f"floor {1000 * floor_s:7.1f} ms/image (36 crops, chunk {chunk}) | script/floor {per_image / floor_s:5.2f} x "
          f"| {clock.split()}")


if __name__ == "__main__":
    main()
