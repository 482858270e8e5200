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

from app.cli import Parser, Setup, UsageError, add_common_flags, build_setup, run_cli
from app.evaluation_run import ucag_settings
from evaluation import distributed
from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.loop import sharded_loop
from evaluation.reports import write_per_image, write_skipped, write_summary
from evaluation.runner import Row, table_rows
from evaluation.segmentation import image_scores
from evaluation.store import ResultStore
from methods import finalize_maps
from methods.postprocess import resize_maps
from models import preprocess

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
    return parser


def row_maps(setup: Setup, row: Row, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Maps at the input size: raw and signed for relevance methods, [0, 1] otherwise."""
    size = tuple(x.shape[-2:])
    explainer = setup.ucag if row.ucag else setup.explainer
    raw = explainer(x, targets).maps
    if explainer.signed:
        return resize_maps(raw.float(), size)
    return setup.ucag.finalize(raw, size) if row.ucag else finalize_maps(raw, size)


def process(setup: Setup, rows: list[Row], batch: list[dict], protocol: str) -> list[dict]:
    x = preprocess([r["image"] for r in batch], setup.spec, setup.device)
    size = tuple(x.shape[-2:])
    masks = torch.stack([F.interpolate(torch.from_numpy(r["mask"]).float()[None, None], size=size, mode="nearest")[0, 0]
                         for r in batch]).to(setup.device)
    with torch.no_grad():
        targets = setup.spec.model(x).argmax(dim=1)
    results = [{"key": r["key"], "target": int(targets[i]), "rows": {}} for i, r in enumerate(batch)]
    for row in rows:
        maps = row_maps(setup, row, x, targets)[:, 0]
        correct, labelled, aps = image_scores(maps, masks, (setup.ucag if row.ucag else setup.explainer).signed,
                                              protocol)
        for i, result in enumerate(results):
            result["rows"][row.name] = {"correct": int(correct[i]), "labelled": int(labelled[i]), "ap": aps[i]}
    return results


def summarize(results: list[dict], rows: list[Row]) -> list[dict]:
    summary = []
    for row in rows:
        values = [r["rows"][row.name] for r in results]
        correct, labelled = sum(v["correct"] for v in values), sum(v["labelled"] for v in values)
        aps = np.array([v["ap"] for v in values], dtype=float)
        summary.append({"name": row.name, "ucag": row.ucag, "pixel_accuracy": correct / max(labelled, 1),
                        "map": float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")})
    return summary


def segmentation_table(summary: dict) -> str:
    base = next(r for r in summary["rows"] if not r["ucag"])
    ucag = next((r for r in summary["rows"] if r["ucag"]), None)
    pair = lambda field: f"{base[field]:.3f}" + (f"/{ucag[field]:.3f}" if ucag else "")  # noqa: E731
    return "\n".join([
        "ImageNet segmentation (layout of the paper's Table 4): original" + (" / with UCAG" if ucag else "") +
        f"; {summary['n_images']} images, AP protocol '{summary['ap']}'.", "",
        f"| Model | Metric | {summary['method']} |", "|---|---|---|",
        f"| {summary['model']} | mAP | {pair('map')} |",
        f"| {summary['model']} | Pixel Acc. | {pair('pixel_accuracy')} |"]) + "\n"


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    info, args.device = distributed.init(args.device)
    try:
        dataset = ImageNetSegmentation(args.data)
        setup = build_setup(args)
        keys = dataset.keys()[:args.limit] if args.limit else dataset.keys()
        out = Path(args.out or f"results/segmentation/{args.name}_{setup.method}{'_ucag' if args.ucag else ''}")
        store = ResultStore(out, info.rank)
        config = {"data": str(Path(args.data).resolve()), "model": args.name, "weights": args.weights,
                  "method": setup.method, "ucag": args.ucag, "ap": args.ap, "layer": setup.spec.target_layer}
        store.check_config({**config, **ucag_settings(args, setup)}, info.is_main)
        rows = table_rows(setup)

        def running(results: list[dict]) -> str:
            return ", ".join(f"{row.name} mAP {np.nanmean([r['rows'][row.name]['ap'] for r in results]):.3f}"
                             for row in rows) if results else ""

        sharded_loop(keys, lambda k: k, dataset.load, lambda batch: process(setup, rows, batch, args.ap), store,
                     info, args.batch_size, args.workers, f"segmentation {setup.method}", running, on_batch)
        info.barrier()
        if info.is_main:
            results, skipped = store.merged()
            if not results:
                raise UsageError(f"no image could be evaluated ({len(skipped)} skipped, see {out}/skipped.txt)")
            for record in results:
                record["file"] = f"{Path(args.data).name}#{record['key']}"
            summary = {"model": args.name, "method": setup.method, "n_images": len(results), "ap": args.ap,
                       "rows": summarize(results, rows)}
            write_per_image(out / "per_image.csv", results, [row.name for row in rows], ("correct", "labelled", "ap"))
            write_skipped(out / "skipped.txt", skipped)
            write_summary(out / "summary.json", summary)
            (out / "table.md").write_text(segmentation_table(summary))
            print(segmentation_table(summary))
    finally:
        distributed.finish(info)
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
