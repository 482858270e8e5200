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

from app.evaluation_run import image_metric_parser, run_sanity
from app.flags import Parser
from app.lifecycle import run_cli
from evaluation.randomisation import MODES

PROG = "sanity.py"
DEFAULT_SEED = 42  # Quantus' MPRT and RandomLogit default


def build_parser() -> Parser:
    parser = image_metric_parser(PROG, __doc__.split("\n")[0], base_from=False)
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
    return run_sanity(build_parser().parse_args(argv), on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)
