#!/usr/bin/env python
"""Insertion and deletion games (paper Table 1) of a method and, with --ucag, of its UCAG version.

    python insdel.py gradcam --ucag -a 2.6 -c 124 -n 6 --name resnet50 --img-path /data/imagenet/val --out runs/r50
    torchrun --nproc_per_node=4 insdel.py gradcam --ucag --name resnet50 --img-path ... --out runs/r50

Writes per_image.csv, summary.json, table.md, curves.png and skipped.txt in --out; rerunning with the
same --out resumes where the last run stopped.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.evaluation_run import image_metric_parser, run_image_metric
from app.flags import Parser, UsageError
from app.lifecycle import run_cli
from evaluation.insertion_deletion import auc, game_curves, numpy_sort_identity
from evaluation.reports import write_insdel_report

PROG = "insdel.py"
FIELDS = ("deletion", "insertion")


def build_parser() -> Parser:
    parser = image_metric_parser(PROG, __doc__.split("\n")[0])
    parser.add_argument("--step", type=int, default=224 * 8, help="pixels changed per step (default 224*8)")
    parser.add_argument("--score-batch", type=int, default=None,
                        help="perturbed images per no-grad forward (default: from free memory, at most 8 on a "
                             "CPU and 1024 on a GPU)")
    return parser


def games(step: int, score_batch: int, ties: str = "raster"):
    def metric(model, images, maps, targets):
        deletion = game_curves(model, images, maps, targets, "deletion", step, score_batch, ties=ties)
        insertion = game_curves(model, images, maps, targets, "insertion", step, score_batch, ties=ties)
        return {"deletion": auc(deletion) * 100, "insertion": auc(insertion) * 100,
                "deletion_curve": deletion, "insertion_curve": insertion}
    return metric


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    if args.step < 1 or (args.score_batch is not None and args.score_batch < 1):
        raise UsageError("--step and --score-batch must be at least 1")
    # --official: the official insdel.py's order of pixels (ties as NumPy's argsort leaves them) and its raw
    # maps for the methods its ucag() leaves raw; the default: ties in raster order, the final [0, 1] maps
    ties = "numpy" if args.official else "raster"
    settings = {"step": args.step, "tie_order": ties, **(numpy_sort_identity() if ties == "numpy" else {})}
    return run_image_metric(args, "insdel", games(args.step, args.score_batch, ties), FIELDS, settings,
                            write_insdel_report, 1, on_batch, official_ranking=args.official,
                            lists=("deletion_curve", "insertion_curve"))


if __name__ == "__main__":
    run_cli(main, prog=PROG)
