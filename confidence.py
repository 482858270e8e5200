#!/usr/bin/env python
"""Average drop and increase in confidence (Chattopadhay et al. 2018) of a method and of its UCAG version.

    python confidence.py gradcam --ucag --name resnet50 --img-path /data/imagenet/val --out runs/confidence

Writes per_image.csv, summary.json, table.md, confidence.png and skipped.txt in --out; reruns resume.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.evaluation_run import image_metric_parser, run_image_metric
from app.flags import Parser
from app.lifecycle import run_cli
from evaluation.confidence_change import confidence_change
from evaluation.reports import write_confidence_report

PROG = "confidence.py"
FIELDS = ("drop", "increase", "change")


def build_parser() -> Parser:
    return image_metric_parser(PROG, __doc__.split("\n")[0])


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    return run_image_metric(args, "confidence", confidence_change, FIELDS, {}, write_confidence_report, 3,
                            on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
