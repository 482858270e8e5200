#!/usr/bin/env python
"""UCAG speed against its floor: per-image time of the base method, of UCAG, and of a no-grad forward of
the same n*n alpha-upscaled crops (the floor, in the same chunk size), with ratios and peak memory.

    python benchmarks/ucag_speed.py                       # embedded model + random resnet50, CPU or GPU
    python benchmarks/ucag_speed.py --device cuda --images 16 --precision bf16
    python benchmarks/ucag_speed.py --geometries 2:1 2:2.6 6:2.6   # n:alpha rows, small geometries too

Two UCAG figures: as the scripts run it ("UCAG", the logits of the images given by the base row that explained
them first, as Row.explain passes them) and alone ("alone", the Python API without logits: one more no-grad
forward of the whole images, which no crop can stand in for: a crop is never the image unless c = 224 and
alpha = 1, and the default target is the image's prediction, needed before any crop is explained).
Target: UCAG(GradCAM) <= 1.10 x floor at every geometry, and faster than pytorch-grad-cam explaining the same
crops. The base method, UCAG and the floor are timed in interleaved rounds (best of --repeats each), so the
machine's drift does not fall between them.
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, Run, add_run_flags, start, timed, timed_together  # noqa: E402
from common.images import find_images, load_rgb  # noqa: E402
from methods import build_explainer  # noqa: E402
from methods.batching import batch_for_memory, even_chunks  # noqa: E402
from models import preprocess  # noqa: E402
from ucag import UCAG  # noqa: E402


def peer_seconds(spec, crops: torch.Tensor, targets: torch.Tensor, method: str, chunk: int, repeats: int,
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
            for first in range(0, crops.shape[0], chunk):
                cam(input_tensor=crops[first:first + chunk], targets=classes[first:first + chunk])
        seconds = timed(run, device, repeats)
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


def bench_model(name: str, args, run: Run, n: int, alpha: float) -> None:
    clock = CpuTime()
    device = run.device
    spec = run.model(name)
    photos = [load_rgb(p) for p in find_images(Path(__file__).resolve().parents[1] / "examples")]
    photos = (photos * args.images)[:args.images]
    x = preprocess(photos, spec, device)
    explainer = build_explainer(args.method, spec)
    ucag = UCAG(explainer, crop=args.crop, n=n, alpha=alpha, patch_batch=args.patch_batch)
    with torch.no_grad(), run.precision.autocast():
        logits = spec.model(x)  # what the base row hands UCAG in the scripts
    grid = ucag.grid(*x.shape[-2:])
    crops = F.interpolate(grid.unfold(x), size=ucag.scaled_size(grid), mode="bicubic", align_corners=False)
    chunk = args.patch_batch or even_chunks(crops.shape[0], batch_for_memory(spec.model, ucag.scaled_size(grid),
                                                                            device, gradients=True))

    def in_precision(fn):
        def call():
            with run.precision.autocast():
                fn()
        return call

    @torch.no_grad()
    def floor():
        for first in range(0, crops.shape[0], chunk):
            spec.model(crops[first:first + chunk])

    def with_logits():
        ucag.explain_blends(x, None, (ucag.blend,), logits=logits)

    seconds = timed_together({"base": in_precision(lambda: explainer(x)), "ucag": in_precision(with_logits),
                              "alone": in_precision(lambda: ucag(x)), "floor": in_precision(floor)},
                             device, args.repeats)
    base_s, ucag_s, alone_s, floor_s = seconds["base"], seconds["ucag"], seconds["alone"], seconds["floor"]
    memory = peak_memory(device, in_precision(lambda: ucag(x)))
    ours = clock.split()
    with torch.no_grad():
        crop_targets = spec.model(x).argmax(dim=1).repeat_interleave(grid.num_crops)
    peer_s = (peer_seconds(spec, crops, crop_targets, explainer.name, chunk, args.repeats, device)
              if not args.no_peer else None)
    per = lambda s: f"{1000 * s / args.images:8.1f} ms"  # noqa: E731
    peer = (f" | pytorch-grad-cam on the same crops {per(peer_s)} (UCAG {peer_s / ucag_s:4.1f} x faster)"
            if peer_s else "")
    print(f"{name:<20} {args.method} n={n} alpha={alpha:g} base {per(base_s)} | UCAG {per(ucag_s)} | "
          f"floor {per(floor_s)} | UCAG/floor {ucag_s / floor_s:5.2f} x | alone {per(alone_s)} "
          f"({alone_s / floor_s:4.2f} x) | UCAG/base {ucag_s / base_s:6.1f} x | images/s "
          f"{args.images / ucag_s:6.2f} | chunk {chunk} | peak {memory}{peer} | ours: {ours}"
          + (f"; peer: {clock.split()}" if peer_s else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--images", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--patch-batch", type=int, default=None, help="default: from free memory, as the scripts")
    parser.add_argument("-n", type=int, default=6)
    parser.add_argument("-a", "--alpha", type=float, default=2.6)
    parser.add_argument("-c", "--crop", type=float, default=124)
    parser.add_argument("--geometries", nargs="+", default=None, metavar="N:ALPHA",
                        help="several n:alpha rows, e.g. 2:1 2:2.6 6:2.6 (default: -n and -a)")
    parser.add_argument("--no-peer", action="store_true", help="skip pytorch-grad-cam")
    add_run_flags(parser, repeats=3)
    args = parser.parse_args()
    geometries = ([(int(n), float(a)) for n, a in (g.split(":") for g in args.geometries)] if args.geometries
                  else [(args.n, args.alpha)])
    run = start(args, f"{args.method}, c={args.crop}, {args.images} image(s)/batch; per-image times")
    for name in args.models:
        for n, alpha in geometries:
            bench_model(name, args, run, n, alpha)


if __name__ == "__main__":
    main()
