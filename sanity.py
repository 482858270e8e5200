#!/usr/bin/env python
"""Sanity checks of a method's maps and of its UCAG version: model-parameter randomisation (Adebayo et al. 2018)
and the random-logit test (Sixt et al. 2020).

    python sanity.py gradcam --ucag --mode cascading --name resnet50 --img-path /data/imagenet/val --out runs/sanity
    python sanity.py gradcam --mode logit --img-path examples --out runs/logit

Writes per_image.csv, summary.json, table.md, sanity_curves.png, sanity_maps.png and skipped.txt in --out;
reruns resume.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from app.evaluation_run import (
    described,
    image_metric_parser,
    labels_identity,
    output_folders,
    results_folder,
    run_evaluation,
)
from app.flags import Parser, UsageError
from app.lifecycle import run_cli
from app.setup import Setup
from evaluation.datasets import discover
from evaluation.distributed import Dist
from evaluation.randomisation import MODES
from evaluation.sanity_report import write_sanity_report
from evaluation.sanity_task import SanityTask
from evaluation.store import ABOUT

PROG = "sanity.py"
DEFAULT_SEED = 42  # Quantus' MPRT and RandomLogit default


def build_parser() -> Parser:
    parser = image_metric_parser(PROG, __doc__.split("\n")[0])
    check = parser.add_argument_group("sanity check")
    check.add_argument("--mode", choices=MODES, default="cascading",
                       help="cascading (default): randomise the layers from the logits down, cumulatively; "
                            "independent: one layer at a time, the others original; logit: the map of a random "
                            "other class against the target's, the model unchanged")
    check.add_argument("--weights-seed", type=int, default=DEFAULT_SEED,
                       help=f"seed of the random weights (each layer's reset_parameters() after "
                            f"torch.manual_seed(seed + 1), on the CPU, as Quantus) and of the random classes of "
                            f"--mode logit (default {DEFAULT_SEED})")
    check.add_argument("--max-steps", type=int, default=None,
                       help="randomise only the top N parameter layers (cascading, independent; default: all)")
    return parser


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1 (got {args.max_steps})")
    if args.max_steps is not None and args.mode == "logit":
        raise UsageError("--max-steps has no effect with --mode logit (one step, the model unchanged)")
    if args.weights_seed < 0:
        raise UsageError(f"--weights-seed must be 0 or more (got {args.weights_seed})")

    def make_task(setup: Setup, info: Dist) -> tuple[SanityTask, dict]:
        outputs = output_folders(args.out or results_folder("sanity", args)(setup), args.img_path)
        samples = info.on_main(lambda: discover(args.img_path, args.labels, setup.spec.num_classes,
                                                need_labels=args.target == "gt", outputs=outputs, limit=args.limit))
        target_mode = args.target or ("gt" if samples[0].label is not None else "pred")
        header = {"model": setup.spec.name, "method": setup.method, "target": target_mode, "mode": args.mode,
                  "weights_seed": args.weights_seed}
        task = SanityTask(samples, setup.spec, setup.device, setup.rows(), args.mode, args.weights_seed,
                          target_mode, args.max_steps, header, report=write_sanity_report,
                          description=f"sanity {args.mode} {described(setup)}")
        labels = labels_identity(args.labels)
        layers = task.labels if args.mode != "logit" else []
        return task, {"target": target_mode, "img_path": str(Path(args.img_path).resolve()), **labels,
                      "mode": args.mode, "weights_seed": args.weights_seed, "layers": layers,
                      ABOUT: labels[ABOUT]}

    return run_evaluation(args, results_folder("sanity", args), make_task, on_batch, metric="sanity")


if __name__ == "__main__":
    run_cli(main, prog=PROG)
