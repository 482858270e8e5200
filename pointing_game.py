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

from app.cli import Parser, Setup, UsageError, add_common_flags, build_setup, run_cli
from app.evaluation_run import ucag_settings
from evaluation import distributed
from evaluation.localization_data import load_entry, open_dataset, read_difficult_list
from evaluation.loop import sharded_loop
from evaluation.pointing import class_mean, energy_score, map_point, pointing_hit
from evaluation.reports import write_skipped, write_summary
from evaluation.runner import Row
from evaluation.store import ResultStore
from methods import build_explainer, finalize_maps
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
    data.add_argument("--out", default=None, help="output folder (default results/pointing/<dataset>_<model>_<method>)")
    return parser


def rows_for(setup: Setup) -> list[tuple[Row, object]]:
    """(row, explainer) pairs: center baseline, the method, the method with UCAG."""
    rows = []
    if setup.method != "center":
        rows.append((Row("center", False), build_explainer("center", setup.spec)))
    rows.append((Row(setup.method, False), setup.explainer))
    if setup.ucag is not None:
        rows.append((Row(f"{setup.method}*", True), setup.ucag))
    return rows


def process_image(setup: Setup, rows, record: dict, flags: dict | None, tolerance: int) -> dict:
    image, targets = record["image"], record["targets"]
    height, width = image.shape[:2]
    pairs = [{"class": t.label,
              "difficult": None if flags is None else bool(flags.get(record["key"], [False] * 1000)[t.label])}
             for t in targets]
    result = {"key": record["key"], "file": str(record["entry"].path), "pairs": pairs, "rows": {}}
    if not targets:
        return result
    x = preprocess_one(image, setup.spec, setup.device).expand(len(targets), -1, -1, -1)
    labels = torch.tensor([t.label for t in targets], device=setup.device)
    for row, explainer in rows:
        raw = explainer(x, labels).maps
        maps = (setup.ucag.finalize(raw, (height, width)) if row.ucag else finalize_maps(raw, (height, width)))[:, 0]
        hits = [pointing_hit(t.mask, map_point(maps[i]), tolerance) for i, t in enumerate(targets)]
        energies = [energy_score(maps[i], t.boxes) for i, t in enumerate(targets)]
        result["rows"][row.name] = {"hit": hits, "energy": energies}
    return result


def aggregate(results: list[dict], row: Row, num_classes: int, with_difficult: bool):
    """Per-class lists of hits and energies, for all pairs and for the difficult subset."""
    per = {key: {c: [] for c in range(num_classes)} for key in FIELDS}
    for record in results:
        scores = record["rows"].get(row.name)
        for i, pair in enumerate(record["pairs"]):
            hit, energy = float(scores["hit"][i]), scores["energy"][i]
            per["pointing_all"][pair["class"]].append(hit)
            per["energy_all"][pair["class"]].append(energy)
            if with_difficult and pair["difficult"]:
                per["pointing_difficult"][pair["class"]].append(hit)
                per["energy_difficult"][pair["class"]].append(energy)
    return per


def write_outputs(out: Path, results, skipped, rows, categories, with_difficult, summary) -> None:
    per_row = {row.name: aggregate(results, row, len(categories), with_difficult) for row in rows}
    for entry in summary["rows"]:
        for field in FIELDS:
            value = class_mean(per_row[entry["name"]][field]) * 100
            entry[field] = value if (with_difficult or not field.endswith("difficult")) else float("nan")
    with open(out / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "name", "pairs_all", "pairs_difficult"] +
                        [f"{row.name}_{field}" for row in rows for field in FIELDS])
        for c, name in enumerate(categories):
            first = per_row[rows[0].name]
            line = [c, name, len(first["pointing_all"][c]), len(first["pointing_difficult"][c])]
            for row in rows:
                line += [f"{100 * np.mean(v):.2f}" if (v := per_row[row.name][field][c]) else "" for field in FIELDS]
            writer.writerow(line)
    write_skipped(out / "skipped.txt", skipped)
    write_summary(out / "summary.json", summary)
    (out / "table.md").write_text(pointing_tables(summary))
    print(pointing_tables(summary))


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.1f}"


def pointing_tables(summary: dict) -> str:
    column = f"{summary['dataset']} {summary['model']}"
    lines = [f"Pointing game (layout of the paper's Table 2): accuracy %, all/difficult, mean over classes; "
             f"{summary['n_images']} images, tolerance {summary['tolerance']} px. `*` = with UCAG.", "",
             f"| Methods | {column} |", "|---|---|"]
    lines += [f"| {r['name']} | {_cell(r['pointing_all'])}/{_cell(r['pointing_difficult'])} |" for r in summary["rows"]]
    lines += ["", "Energy-based pointing game (layout of the paper's Table 3): all(difficult), without / with UCAG.",
              "", "| Model | Dataset | " + " | ".join(r["name"] for r in summary["rows"] if not r["ucag"]) + " |",
              "|---|---|" + "---|" * sum(not r["ucag"] for r in summary["rows"])]
    cells = []
    for row in summary["rows"]:
        if row["ucag"]:
            continue
        text = f"{_cell(row['energy_all'])}({_cell(row['energy_difficult'])})"
        with_ucag = next((r for r in summary["rows"] if r["ucag"] and r["name"] == f"{row['name']}*"), None)
        if with_ucag:
            text += f"/{_cell(with_ucag['energy_all'])}({_cell(with_ucag['energy_difficult'])})"
        cells.append(text)
    lines.append(f"| {summary['model']} | {summary['dataset']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, on_batch=None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be 0 or more (got {args.tolerance})")
    info, args.device = distributed.init(args.device)
    try:
        dataset = open_dataset(args.dataset, args.data_root)
        flags = read_difficult_list(args.difficult_list, len(dataset.categories)) if args.difficult_list else None
        setup = build_setup(args, load_spec=lambda device: load_multilabel(
            args.name, dataset.categories, args.weights, device, args.target_layer))
        entries = dataset.entries[:args.limit] if args.limit else dataset.entries
        if flags is not None and info.is_main:
            missing = sum(entry.key not in flags for entry in entries)
            if missing:
                tqdm.write(f"note: {missing} image(s) are not in {args.difficult_list}; they count in 'all' only")
        suffix = "_ucag" if args.ucag else ""
        out = Path(args.out or f"results/pointing/{args.dataset}_{args.name}_{setup.method}{suffix}")
        store = ResultStore(out, info.rank)
        config = {"dataset": args.dataset, "data_root": str(Path(args.data_root).resolve()), "model": args.name,
                  "weights": args.weights, "method": setup.method, "ucag": args.ucag, "tolerance": args.tolerance,
                  "difficult_list": args.difficult_list, "layer": setup.spec.target_layer}
        store.check_config({**config, **ucag_settings(args, setup)}, info.is_main)
        rows = rows_for(setup)

        def running(results: list[dict]) -> str:
            hits = {row.name: [h for r in results for h in r["rows"].get(row.name, {}).get("hit", [])]
                    for row, _ in rows}
            return ", ".join(f"{name} {100 * np.mean(v):.1f}%" for name, v in hits.items() if v)

        sharded_loop(entries, lambda e: e.key, lambda e: load_entry(dataset, e),
                     lambda batch: [process_image(setup, rows, r, flags, args.tolerance) for r in batch],
                     store, info, args.batch_size, args.workers,
                     f"pointing {setup.method}{' + UCAG' if setup.ucag else ''}", running, on_batch)
        info.barrier()
        if info.is_main:
            results, skipped = store.merged()
            if not results:
                raise UsageError(f"no image could be evaluated ({len(skipped)} skipped, see {out}/skipped.txt)")
            summary = {"dataset": args.dataset, "model": args.name, "method": setup.method,
                       "n_images": len(results), "n_pairs": sum(len(r["pairs"]) for r in results),
                       "tolerance": args.tolerance,
                       "rows": [{"name": row.name, "ucag": row.ucag} for row, _ in rows]}
            write_outputs(out, results, skipped, [row for row, _ in rows], dataset.categories,
                          flags is not None, summary)
    finally:
        distributed.finish(info)
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
