#!/usr/bin/env python
"""Pointing game and energy-based pointing game (paper Tables 2 and 3) on VOC07 test or COCO14 val.

    python pointing_game.py gradcam --ucag --dataset voc07 --data-root /data/VOCdevkit --name vgg16 \\
        --weights vgg16_voc-b050e8c3.pth.tar --difficult-list pointing_game_ebp_voc07_difficult.txt

Every class present in an image is explained separately (all of an image's classes in one batch); the
map is resized to the original image; a hit is a ground-truth pixel closer than 15 px to the map's
maximum; accuracy is the mean over classes. The energy game uses the same maps. Rows: the `center`
baseline, the method, and with --ucag the method with UCAG. Writes per_class.csv, summary.json,
table.md and skipped.txt in --out; reruns resume; runs under torchrun.
"""
from __future__ import annotations

from collections.abc import Sequence

from app.evaluation_run import add_fresh_flag, run_pointing_game
from app.flags import Parser, add_common_flags
from app.lifecycle import run_cli
from evaluation.pointing import AGGREGATIONS, UNLISTED

PROG = "pointing_game.py"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    add_common_flags(parser, default_batch=4)
    parser.set_defaults(name="vgg16")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=["voc07", "coco14"])
    data.add_argument("--data-root", required=True,
                      help="VOC: VOCdevkit/VOC2007 (or a parent); COCO: folder with val2014/ and annotations/")
    data.add_argument("--difficult-list", default=None,
                      help="EBP difficult flags: '<image id>\\t<0/1 per class>' per line (TorchRay's files)")
    data.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    data.add_argument("--tolerance", type=int, default=15, help="pointing tolerance in pixels (default 15)")
    data.add_argument("--aggregation", choices=AGGREGATIONS, default="torchray",
                      help="accuracy = mean over all classes, a class without pairs counting as 0 (torchray, "
                           "default), or over the classes with at least one pair (evaluated-classes)")
    data.add_argument("--unlisted", choices=UNLISTED, default="difficult",
                      help="with --difficult-list, images missing from it: all their pairs in the difficult "
                           "subset (difficult, TorchRay's rule, default) or in 'all' only (all-only)")
    data.add_argument("--out", default=None, help="output folder (default results/pointing/<dataset>_<model>_<method>)")
    add_fresh_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    return run_pointing_game(build_parser().parse_args(argv), on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
