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

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from app.evaluation_run import add_fresh_flag, check_out, hashed_file, run_evaluation
from app.flags import Parser, UsageError, add_common_flags
from app.lifecycle import run_cli
from app.setup import Setup
from common.images import display_path
from evaluation.distributed import Dist
from evaluation.driver import Row, RunningMeans, Task
from evaluation.errors import EvaluationError
from evaluation.localization_data import load_entry, open_dataset, read_difficult_list
from evaluation.pointing import (
    AGGREGATIONS,
    UNLISTED,
    class_mean,
    energy_score,
    explainer_point,
    in_difficult_subset,
    pointing_accuracy,
    pointing_hit,
)
from evaluation.reports import open_report, pointing_tables, write_skipped, write_summary, write_text
from models.multilabel import load_multilabel
from models.preprocessing import preprocess_one

PROG = "pointing_game.py"
FIELDS = ("pointing_all", "pointing_difficult", "energy_all", "energy_difficult")


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


def process_image(rows: list[Row], spec, device, record: dict, flags: dict | None, unlisted: str,
                  tolerance: int) -> dict:
    """Every class present in the image explained in one batch, by every row; hits and energies per class.
    Maps are resized to the image as TorchRay does (plain bilinear); the center baseline points at TorchRay's
    exact centre."""
    image, targets = record["image"], record["targets"]
    height, width = image.shape[:2]
    pairs = [{"class": t.label,
              "difficult": None if flags is None else in_difficult_subset(flags, record["key"], t.label, unlisted)}
             for t in targets]
    result = {"key": record["key"], "file": display_path(record["entry"].path), "pairs": pairs, "rows": {}}
    if not targets:
        return result
    x = preprocess_one(image, spec, device).expand(len(targets), -1, -1, -1)
    labels = torch.tensor([t.label for t in targets], device=device)
    logits = None
    for row in rows:
        explanation = row.explain(x, labels, logits)
        logits = explanation.logits
        # to the host once per row: the per-class points, hits and energies below each read values back
        maps = row.explainer.finalize(explanation.maps, (height, width), antialias=False)[:, 0].cpu()
        hits = [pointing_hit(t.mask, explainer_point(row.explainer, maps[i]), tolerance)
                for i, t in enumerate(targets)]
        energies = [energy_score(maps[i], t.boxes) for i, t in enumerate(targets)]
        result["rows"][row.name] = {"hit": hits, "energy": energies}
    return result


def aggregate(results: list[dict], row_name: str, num_classes: int, with_difficult: bool):
    """Per-class lists of hits and energies, for all pairs and for the difficult subset."""
    per = {key: {c: [] for c in range(num_classes)} for key in FIELDS}
    for record in results:
        scores = record["rows"].get(row_name)
        for i, pair in enumerate(record["pairs"]):
            hit, energy = float(scores["hit"][i]), scores["energy"][i]
            per["pointing_all"][pair["class"]].append(hit)
            per["energy_all"][pair["class"]].append(energy)
            if with_difficult and pair["difficult"]:
                per["pointing_difficult"][pair["class"]].append(hit)
                per["energy_difficult"][pair["class"]].append(energy)
    return per


def summarize(results: list[dict], rows: list[Row], num_classes: int, with_difficult: bool,
              aggregation: str) -> list[dict]:
    """Each row's pointing accuracy (``aggregation`` over classes) and class-mean energy (%), for all pairs
    and for the difficult subset."""
    summary = []
    for row in rows:
        per = aggregate(results, row.name, num_classes, with_difficult)
        entry = {"name": row.name, "ucag": row.ucag}
        for field in FIELDS:
            if not with_difficult and field.endswith("difficult"):
                entry[field] = float("nan")
            elif field.startswith("pointing"):
                entry[field] = pointing_accuracy(per[field], num_classes, aggregation) * 100
            else:
                entry[field] = class_mean(per[field]) * 100
        summary.append(entry)
    return summary


def write_per_class(path: Path, results: list[dict], row_names: list[str], categories: Sequence[str],
                    with_difficult: bool) -> None:
    per_row = {name: aggregate(results, name, len(categories), with_difficult) for name in row_names}
    with open_report(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "name", "pairs_all", "pairs_difficult"] +
                        [f"{name}_{field}" for name in row_names for field in FIELDS])
        for c, name in enumerate(categories):
            first = per_row[row_names[0]]
            line = [c, name, len(first["pointing_all"][c]), len(first["pointing_difficult"][c])]
            for row_name in row_names:
                line += [f"{100 * np.mean(v):.2f}" if (v := per_row[row_name][field][c]) else "" for field in FIELDS]
            writer.writerow(line)


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be 0 or more (got {args.tolerance})")
    check_out(args)
    dataset = open_dataset(args.dataset, args.data_root)
    flags = read_difficult_list(args.difficult_list, len(dataset.categories)) if args.difficult_list else None
    with_difficult = flags is not None

    def make_task(setup: Setup, info: Dist) -> tuple[Task, dict]:
        rows = setup.rows(center=True)
        entries = dataset.entries[:args.limit] if args.limit else dataset.entries
        if flags is not None:
            missing = sum(entry.key not in flags for entry in entries)
            if missing:
                subset = "in 'all' and in the difficult subset" if args.unlisted == "difficult" else "in 'all' only"
                tqdm.write(f"note: {missing} image(s) are not in {args.difficult_list}; their pairs count {subset} "
                           f"(--unlisted {args.unlisted})")

        def summary_of(results: list[dict]) -> dict:
            if not any(r["pairs"] for r in results):
                raise EvaluationError(f"none of the {len(results)} evaluated image(s) has a class to point at "
                                      "(every object 'difficult' or none annotated); the table would be empty")
            return {"dataset": args.dataset, "model": args.name, "method": setup.method, "n_images": len(results),
                    "n_pairs": sum(len(r["pairs"]) for r in results), "tolerance": args.tolerance,
                    "aggregation": args.aggregation,
                    "rows": summarize(results, rows, len(dataset.categories), with_difficult, args.aggregation)}

        def write(out: Path, results: list[dict], skipped: list[dict], summary: dict) -> None:
            write_per_class(out / "per_class.csv", results, [row.name for row in rows], dataset.categories,
                            with_difficult)
            write_skipped(out / "skipped.txt", skipped)
            write_summary(out / "summary.json", summary)
            write_text(out / "table.md", pointing_tables(summary))
            print(pointing_tables(summary))

        def score(batch: list[dict]) -> list[dict]:
            return [process_image(rows, setup.spec, setup.device, r, flags, args.unlisted, args.tolerance)
                    for r in batch]

        running = RunningMeans(("hit",), digits=1, scale=100, unit="%")  # each row's hit rate over pairs so far
        task = Task(entries, lambda e: e.key, lambda e: load_entry(dataset, e), score, summary_of, write, running,
                    f"pointing {setup.method}{' + UCAG' if setup.ucag else ''}",
                    {"rows": [row.name for row in rows], "lists": ("hit", "energy"), "keys": ("file", "pairs"),
                     "unscored": "pairs"})
        difficult_hash, difficult_path = hashed_file(args.difficult_list)
        return task, {"dataset": args.dataset, "data_root": str(Path(args.data_root).resolve()),
                      "tolerance": args.tolerance, "difficult_list": difficult_hash,
                      "aggregation": args.aggregation, "unlisted": args.unlisted,
                      "about": {"difficult_list": difficult_path}}

    def default_out(setup: Setup) -> Path:
        return Path(f"results/pointing/{args.dataset}_{args.name}_{setup.method}{'_ucag' if args.ucag else ''}")

    return run_evaluation(args, default_out, make_task, on_batch, load_spec=lambda device: load_multilabel(
        args.name, dataset.categories, args.weights, device, args.target_layer), metric="pointing_game")


if __name__ == "__main__":
    run_cli(main, prog=PROG)
