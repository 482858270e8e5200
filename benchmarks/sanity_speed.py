#!/usr/bin/env python
"""Sanity checks: per-image, per-step time of the check against the explanation calls it needs.

    python benchmarks/sanity_speed.py                                 # CPU: lite0, gradcam and gradcam + UCAG
    python benchmarks/sanity_speed.py --device cuda --models resnet50 --images 1 4 --max-steps 8

A cascading check of K steps over B images explains every row K + 1 times (the original maps, then once per
step) after one forward for the predicted classes. The check (SanityTask.process: those calls plus the
randomisation, its restore and the four similarities) is timed against exactly those calls on the unchanged
model, in interleaved rounds (best of --repeats each). Target (issue 23): at most 1.15 x on the CPU. The photos
are the bundled examples (repeated to --images).
"""
from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import CpuTime, add_run_flags, start, timed_together  # noqa: E402
from evaluation.datasets import discover  # noqa: E402
from evaluation.image_metric import load_sample  # noqa: E402
from evaluation.rows import Row, batch_targets, explain_rows  # noqa: E402
from evaluation.sanity_task import SanityTask  # noqa: E402
from methods import build_explainer  # noqa: E402
from ucag import UCAG  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--images", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--max-steps", type=int, default=4, help="cascading steps timed (default 4)")
    parser.add_argument("--mode", choices=["cascading", "independent"], default="cascading")
    parser.add_argument("-n", type=int, default=2, help="UCAG crops per side (default 2)")
    parser.add_argument("-a", "--alpha", type=float, default=1.0)
    parser.add_argument("-c", "--crop", type=float, default=180)
    add_run_flags(parser, repeats=3)
    args = parser.parse_args()
    run = start(args, f"{args.mode}, {args.max_steps} steps, UCAG n={args.n} alpha={args.alpha:g} "
                      f"c={args.crop:g}; per-image, per-step milliseconds")
    photos = discover(EXAMPLES, None, 1000, need_labels=False)
    for name in args.models:
        clock = CpuTime()
        spec = run.model(name)
        explainer = build_explainer(args.method, spec)
        variants = {args.method: [Row(args.method, explainer)],
                    f"{args.method} + UCAG": [Row(args.method, explainer),
                                              Row(f"{args.method}*", UCAG(explainer, crop=args.crop, n=args.n,
                                                                          alpha=args.alpha), ucag=True)]}
        for label, rows in variants.items():
            for count in args.images:
                batch = [load_sample(photos[i % len(photos)]) for i in range(count)]
                for i, record in enumerate(batch):
                    record["key"] = f"{record['key']}#{i}"
                task = SanityTask(photos, spec, run.device, rows, args.mode, 42, "pred", args.max_steps)

                def check(task=task, batch=batch):
                    with run.precision.autocast():
                        task.process(batch)

                def calls(rows=rows, batch=batch, task=task, model=spec.model):
                    with run.precision.autocast():
                        x = task.images(batch)
                        targets, logits = batch_targets(model, x, None)
                        deque(explain_rows(rows, x, targets, logits), maxlen=0)  # every row explained
                        for _ in range(args.max_steps):
                            deque(explain_rows(rows, x, targets), maxlen=0)

                times = timed_together({"check": check, "calls": calls}, run.device, args.repeats)
                per = count * (args.max_steps + 1)
                print(f"{name} {label} B={count}: check {1e3 * times['check'] / per:8.1f} ms | explanation calls "
                      f"{1e3 * times['calls'] / per:8.1f} ms | {times['check'] / times['calls']:.2f} x")
        print(f"{name}: {clock.split()}")


if __name__ == "__main__":
    main()
