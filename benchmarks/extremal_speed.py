#!/usr/bin/env python
"""Extremal perturbations: time per iteration next to one forward+backward of the same B*A perturbed images.

    python benchmarks/extremal_speed.py                                   # CPU: lite0, 1 and 4 images
    python benchmarks/extremal_speed.py --models vgg16 resnet50 --device cuda --images 1 4 16

Each iteration is one forward+backward of all B images x A areas at once, plus the mask generator, the
perturbation and the area constraint's sort. The per-iteration time is (t(1 + N) - t(1)) / N for the
explainer run with max_iter 1 + N and with max_iter 1 (which costs only the setup: the logits, the blur
pyramid and the final mask), so it leaves the setup out. A whole map costs 800 iterations (TorchRay's
benchmark), 799 of them optimisation steps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, start, timed, timed_together  # noqa: E402
from methods import build_explainer  # noqa: E402
from methods.extremal import AREAS, MAX_ITER  # noqa: E402


def input_gradient(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward of ``x`` and the backward of its top logits to the input only (what an iteration needs)."""
    leaf = x.clone().requires_grad_(True)
    torch.autograd.grad(model(leaf).max(dim=1).values.sum(), leaf)


def measure(run, spec, batch: int, args: argparse.Namespace) -> str:
    """The line of one model and batch size B."""
    areas = len(AREAS.default)
    x = torch.randn(batch, 3, args.size, args.size, device=run.device)
    targets = torch.zeros(batch, dtype=torch.long, device=run.device)
    perturbed = x.repeat_interleave(areas, dim=0)

    def explain(max_iter: int):
        explainer = build_explainer("extremal", spec, max_iter=max_iter)

        def call():
            with run.precision.autocast():
                explainer(x, targets)
        return call

    def reference():
        with run.precision.autocast():
            input_gradient(spec.model, perturbed)

    times = timed_together({"setup": explain(1), "run": explain(1 + args.iterations)}, run.device, args.repeats)
    unit = timed(reference, run.device, args.repeats)
    step = (times["run"] - times["setup"]) / args.iterations
    whole = times["setup"] + (MAX_ITER.default - 1) * step
    return (f"{spec.name} B={batch}: iteration {1000 * step:.0f} ms = {step / unit:.2f} x forward+backward of "
            f"{batch * areas} images ({1000 * unit:.0f} ms); setup {1000 * times['setup']:.0f} ms; "
            f"{MAX_ITER.default} iterations: {whole:.1f} s, {whole / batch:.1f} s per image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4], help="batch sizes B")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations N")
    add_run_flags(parser, repeats=1)
    args = parser.parse_args()
    run = start(args, f"{args.size} px, A = {len(AREAS.default)} areas, {args.iterations} timed iterations")
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name)
        for batch in args.images:
            print(measure(run, spec, batch, args), flush=True)
        print(f"{name}: {clock.split()}", flush=True)


if __name__ == "__main__":
    main()
