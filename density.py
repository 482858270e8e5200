#!/usr/bin/env python
"""Positive and negative map densities (paper Eq. 7-8, Table 5) of a method and of its UCAG version.

    python density.py gradcam --ucag --name resnet50 --img-path /data/imagenet/val --out runs/density

Writes per_image.csv, summary.json, table.md and skipped.txt in --out; reruns resume.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.evaluation_run import image_metric_parser, run_image_metric
from app.flags import Parser
from app.lifecycle import run_cli
from evaluation.map_density import map_density
from evaluation.reports import write_density_report

PROG = "density.py"
FIELDS = ("positive", "negative")


def build_parser() -> Parser:
    parser = image_metric_parser(PROG, __doc__.split("\n")[0])
    return parser


def densities(model, images, maps, targets):
    positive, negative = map_density(model, images, maps, targets)
    return {"positive": positive, "negative": negative}


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    return run_image_metric(args, "density", densities, FIELDS, {}, write_density_report, 2,
                            on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
