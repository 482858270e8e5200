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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from app.evaluation_run import add_fresh_flag, check_out, results_folder, run_evaluation
from app.flags import Parser, add_common_flags
from app.lifecycle import run_cli
from app.setup import Setup
from evaluation.distributed import Dist
from evaluation.driver import Row, RunningMeans, Task
from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.reports import write_segmentation_report
from evaluation.segmentation_metrics import image_scores
from evaluation.store import file_sha256
from models import preprocess
from ucag.framework import image_logits

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


def row_maps(row: Row, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The row's final maps at the input size: [-1, 1] with the sign kept for signed (relevance) methods,
    thresholded at 0; [0, 1] otherwise, thresholded at the mean. ``logits``: x's, computed once for the batch
    (a UCAG row skips its own forward of the images)."""
    explainer = row.explainer
    raw = row.explain(x, targets, logits).maps
    size = tuple(x.shape[-2:])
    return explainer.finalize_signed(raw, size) if explainer.signed else explainer.finalize(raw, size)


def process(setup: Setup, rows: list[Row], batch: list[dict], protocol: str, source: str) -> list[dict]:
    x = preprocess([r["image"] for r in batch], setup.spec, setup.device)
    size = tuple(x.shape[-2:])
    masks = torch.stack([F.interpolate(torch.from_numpy(r["mask"]).float()[None, None], size=size, mode="nearest")[0, 0]
                         for r in batch]).to(setup.device)
    logits = image_logits(setup.spec.model, x)
    targets = logits.argmax(dim=1)
    results = [{"key": r["key"], "file": f"{source}#{r['key']}", "target": int(targets[i]), "rows": {}}
               for i, r in enumerate(batch)]
    for row in rows:
        maps = row_maps(row, x, targets, logits)[:, 0]
        correct, labelled, aps = image_scores(maps, masks, row.explainer.signed, protocol)
        for i, result in enumerate(results):
            result["rows"][row.name] = {"correct": int(correct[i]), "labelled": int(labelled[i]), "ap": aps[i]}
    return results


def summarize(results: list[dict], rows: list[Row]) -> list[dict]:
    """Pixel accuracy over the dataset's labelled pixels; mAP = mean over images of the AP."""
    summary = []
    for row in rows:
        values = [r["rows"][row.name] for r in results]
        correct, labelled = sum(v["correct"] for v in values), sum(v["labelled"] for v in values)
        aps = np.array([v["ap"] for v in values], dtype=float)
        summary.append({"name": row.name, "ucag": row.ucag, "pixel_accuracy": correct / max(labelled, 1),
                        "map": float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")})
    return summary


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    check_out(args)
    dataset = ImageNetSegmentation(args.data)

    def make_task(setup: Setup, info: Dist) -> tuple[Task, dict]:
        rows = setup.rows()
        keys = dataset.keys()[:args.limit] if args.limit else dataset.keys()

        def summary_of(results: list[dict]) -> dict:
            return {"model": args.name, "method": setup.method, "n_images": len(results), "ap": args.ap,
                    "rows": summarize(results, rows)}

        def score(batch: list[dict]) -> list[dict]:
            return process(setup, rows, batch, args.ap, Path(args.data).name)

        running = RunningMeans(("ap",), digits=3, label="mAP ")
        task = Task(keys, str, dataset.load, score, summary_of, write_segmentation_report, running,
                    f"segmentation {setup.method}",
                    {"rows": [row.name for row in rows], "fields": ("correct", "labelled", "ap"),
                     "keys": ("file", "target")})
        # the .mat file's content hash: a file replaced under the same path is not resumed into the old records
        return task, {"data": str(Path(args.data).resolve()), "data_hash": file_sha256(args.data), "ap": args.ap}

    return run_evaluation(args, results_folder("segmentation", args), make_task, on_batch, metric="segmentation")


if __name__ == "__main__":
    run_cli(main, prog=PROG)
