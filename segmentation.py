#!/usr/bin/env python
"""ImageNet segmentation (paper Table 4): pixel accuracy and mAP of a method's maps and of its UCAG version.

    python segmentation.py gradcam --ucag --name vgg19 --data /data/gtsegs_ijcv.mat --device cuda

The predicted class is explained at the model's input size (224 x 224); the map is thresholded at its
mean (non-negative maps) or at 0 (signed relevance maps); pixel accuracy = correct / labelled pixels over
the dataset; mAP = mean over images of the average precision. Writes per_image.csv, summary.json,
table.md and skipped.txt in --out; reruns resume; runs under torchrun.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.evaluation_run import add_fresh_flag, run_segmentation
from app.flags import Parser, add_common_flags
from app.lifecycle import run_cli

PROG = "segmentation.py"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    add_common_flags(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="gtsegs_ijcv.mat (MATLAB v7.3)")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    data.add_argument("--ap", choices=["map", "agf"], default="map",
                      help="AP of the map's values (default) or of the thresholded two-channel output (AGF script)")
    data.add_argument("--out", default=None, help="output folder (default results/segmentation/<model>_<method>)")
    add_fresh_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    return run_segmentation(build_parser().parse_args(argv), on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
