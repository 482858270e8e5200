#!/usr/bin/env python
"""ROAD (Rong et al. 2022): MoRF and LeRF removal with noisy linear imputation, of a method and its UCAG version.

    python road.py gradcam --ucag --name resnet50 --img-path /data/imagenet/val --out runs/road
    python road.py gradcam --percentiles 10 30 50 70 90 --imputation-noise 0 --img-path examples

Writes per_image.csv, summary.json, table.md, road_curves.png and skipped.txt in --out; reruns resume.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.evaluation_run import image_metric_parser, run_image_metric
from app.flags import Parser, UsageError
from app.lifecycle import run_cli
from evaluation.reports import write_road_report
from evaluation.road import DEFAULT_NOISE, DEFAULT_PERCENTILES, RoadMetric

PROG = "road.py"
FIELDS = ("morf", "lerf", "combined", "morf_accuracy", "lerf_accuracy", "original")
CURVES = ("morf_curve", "lerf_curve", "morf_correct", "lerf_correct")


def build_parser() -> Parser:
    parser = image_metric_parser(PROG, __doc__.split("\n")[0])
    road = parser.add_argument_group("ROAD")
    road.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES),
                      help="shares of the pixels removed, in percent, each in (0, 100) (default 10 20 ... 90)")
    road.add_argument("--imputation-noise", type=float, default=DEFAULT_NOISE,
                      help=f"sigma of the Gaussian noise added to imputed values, normalised space (default "
                           f"{DEFAULT_NOISE}, the ROAD authors'; 0: plain linear imputation)")
    road.add_argument("--noise-seed", type=int, default=0,
                      help="seed of the imputation noise (each image's generator: this seed and the image's key)")
    road.add_argument("--score-batch", type=int, default=None,
                      help="imputed images per no-grad forward (default: from free memory)")
    return parser


def check_road_flags(args) -> None:
    """One-line errors for the ROAD flags."""
    bad = [p for p in args.percentiles if not 0 < p < 100]
    if bad:
        raise UsageError(f"--percentiles must each lie in (0, 100), got {bad[0]:g}")
    if len(set(args.percentiles)) != len(args.percentiles):
        raise UsageError("--percentiles are given twice: each percentile once")
    if not args.imputation_noise >= 0:  # also refuses NaN
        raise UsageError(f"--imputation-noise must be 0 or more, got {args.imputation_noise:g}")
    if args.score_batch is not None and args.score_batch < 1:
        raise UsageError("--score-batch must be at least 1")


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    check_road_flags(args)
    percentiles = sorted(args.percentiles)
    settings = {"percentiles": percentiles, "imputation_noise": args.imputation_noise, "noise_seed": args.noise_seed}
    metric = RoadMetric(percentiles, args.imputation_noise, args.noise_seed, args.score_batch)
    return run_image_metric(args, "road", metric, FIELDS, settings, write_road_report, 3, on_batch, lists=CURVES)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
