#!/usr/bin/env python
"""Positive and negative map densities (paper Eq. 7-8, Table 5) of a method and of its UCAG version.

    python density.py gradcam --ucag --name resnet50 --img-path /data/imagenet/val --out runs/density

Writes per_image.csv, summary.json, table.md and skipped.txt in --out; reruns resume.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.cli import Parser, add_common_flags, add_eval_flags, run_cli
from app.evaluation_run import run_evaluation
from evaluation.density import map_density
from evaluation.reports import density_table, write_per_image, write_skipped, write_summary

PROG = "density.py"
FIELDS = ("positive", "negative")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    add_common_flags(parser)
    add_eval_flags(parser)
    return parser


def densities(model, images, maps, targets):
    positive, negative = map_density(model, images, maps, targets)
    return {"positive": positive, "negative": negative}


def running_means(records: list[dict]) -> str:
    if not records:
        return ""
    return ", ".join(
        f"{name} +{np.nanmean([r['rows'][name]['positive'] for r in records]):.2f}"
        f"/-{np.nanmean([r['rows'][name]['negative'] for r in records]):.2f}" for name in records[0]["rows"])


def write_outputs(out, results, skipped, rows, summary) -> None:
    write_per_image(out / "per_image.csv", results, [row.name for row in rows], FIELDS)
    write_skipped(out / "skipped.txt", skipped)
    write_summary(out / "summary.json", summary)
    (out / "table.md").write_text(density_table(summary))
    print(density_table(summary))


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    return run_evaluation(args, "density", densities, FIELDS, {}, running_means, write_outputs, on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
