#!/usr/bin/env python
"""UCAG speed against its floor: per-image time of the base method, of UCAG, and of a no-grad forward of
the same n*n alpha-upscaled crops (the floor, in the same chunk size), with ratios and peak memory.

    python benchmarks/ucag_speed.py                       # embedded model + random resnet50, CPU or GPU
    python benchmarks/ucag_speed.py --device cuda --images 16 --patch-batch 288

Target: UCAG(GradCAM) <= 1.10 x floor, and faster than pytorch-grad-cam explaining the same crops.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.cli import resolve_device  # noqa: E402
from common.allocator import keep_freed_memory  # noqa: E402
from common.images import find_images, load_rgb  # noqa: E402
from methods import build_explainer  # noqa: E402
from models import load_model, preprocess  # noqa: E402
from ucag import UCAG  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` runs after one warm-up (seconds)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward_once(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward of the top logit: the unit the methods are compared with."""
    leaf = x.clone().requires_grad_(True)
    model(leaf).max(dim=1).values.sum().backward()
    model.zero_grad(set_to_none=True)


def peer_seconds(spec, crops: torch.Tensor, targets: torch.Tensor, method: str, args,
                 device: torch.device) -> float | None:
    """pytorch-grad-cam (a test-only peer) explaining the same upscaled crops for the same classes, in the same
    chunk size: what UCAG would cost built on it (before any folding). None when it is not installed or has
    no such method."""
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    peer = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}.get(method)
    if peer is None:
        return None
    classes = [ClassifierOutputTarget(int(k)) for k in targets.tolist()]
    with peer(model=spec.model, target_layers=[spec.model.get_submodule(spec.target_layer)]) as cam:
        def run():
            for start in range(0, crops.shape[0], args.patch_batch):
                stop = start + args.patch_batch
                cam(input_tensor=crops[start:stop], targets=classes[start:stop])
        seconds = timed(run, device, args.repeats)
    spec.model.zero_grad(set_to_none=True)
    return seconds


def peak_memory(device: torch.device, fn) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"{peak:.0f} MiB RSS (process peak so far, earlier models and peers included)"


def bench_model(name: str, weights: str, args, device: torch.device) -> None:
    torch.manual_seed(0)
    spec = load_model(name, weights, device)
    photos = [load_rgb(p) for p in find_images(Path(__file__).resolve().parents[1] / "examples")]
    photos = (photos * args.images)[:args.images]
    x = preprocess(photos, spec, device)
    explainer = build_explainer(args.method, spec)
    ucag = UCAG(explainer, crop=args.crop, n=args.n, alpha=args.alpha, patch_batch=args.patch_batch)
    grid = ucag.grid(*x.shape[-2:])
    crops = F.interpolate(grid.unfold(x), size=ucag.scaled_size(grid), mode="bicubic", align_corners=False)

    @torch.no_grad()
    def floor():
        for start in range(0, crops.shape[0], args.patch_batch):
            spec.model(crops[start:start + args.patch_batch])

    base_s = timed(lambda: explainer(x), device, args.repeats)
    ucag_s = timed(lambda: ucag(x), device, args.repeats)
    floor_s = timed(floor, device, args.repeats)
    memory = peak_memory(device, lambda: ucag(x))
    with torch.no_grad():
        crop_targets = spec.model(x).argmax(dim=1).repeat_interleave(grid.num_patches)
    peer_s = peer_seconds(spec, crops, crop_targets, explainer.name, args, device)
    per = lambda s: f"{1000 * s / args.images:8.1f} ms"  # noqa: E731
    peer = (f" | pytorch-grad-cam on the same crops {per(peer_s)} (UCAG {peer_s / ucag_s:4.1f} x faster)"
            if peer_s else "")
    print(f"{name:<20} {args.method} base {per(base_s)} | UCAG {per(ucag_s)} | floor {per(floor_s)} "
          f"| UCAG/floor {ucag_s / floor_s:5.2f} x | UCAG/base {ucag_s / base_s:6.1f} x | peak {memory}{peer}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--device", default=None)
    parser.add_argument("--images", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--patch-batch", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-n", type=int, default=6)
    parser.add_argument("-a", "--alpha", type=float, default=2.6)
    parser.add_argument("-c", "--crop", type=float, default=124)
    args = parser.parse_args()
    print(f"allocator: {keep_freed_memory()} (UCAG_SYSTEM_MALLOC=1 measures the default)")
    device = resolve_device(args.device)
    warnings.simplefilter("ignore")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {gpu}; n={args.n}, alpha={args.alpha}, c={args.crop}, "
          f"{args.images} image(s)/batch, patch batch {args.patch_batch}; per-image times, best of {args.repeats}")
    for name in args.models:
        bench_model(name, "default" if name == "efficientnet_lite0" else "random", args, device)


if __name__ == "__main__":
    main()
