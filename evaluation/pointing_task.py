"""The pointing game and the energy-based pointing game (paper Tables 2 and 3) as one :class:`PointingGameTask`
over a VOC07 or COCO14 dataset (:mod:`evaluation.localization_data`); the per-map rules are
:mod:`evaluation.pointing`'s (TorchRay's protocol)."""
from __future__ import annotations

import csv
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.images import display_path
from evaluation.errors import EvaluationError
from evaluation.localization_data import COCO2014, VOC2007, ImageEntry, load_entry
from evaluation.pointing import (
    class_mean,
    energy_score,
    explainer_point,
    in_difficult_subset,
    pointing_accuracy,
    pointing_hit,
)
from evaluation.reports import open_report, pointing_tables, write_skipped, write_summary, write_text
from evaluation.rows import Row, explain_rows
from evaluation.task import RunningMeans, RunningText, Task
from models import ModelSpec
from models.preprocessing import preprocess_one

FIELDS = ("pointing_all", "pointing_difficult", "energy_all", "energy_difficult")


def aggregate(records: Iterable[dict], row_name: str, num_classes: int, with_difficult: bool) -> dict:
    """Per-class lists of hits and energies, for all pairs and for the difficult subset."""
    per = {key: {c: [] for c in range(num_classes)} for key in FIELDS}
    for record in records:
        scores = record["rows"].get(row_name)
        for i, pair in enumerate(record["pairs"]):
            hit, energy = float(scores["hit"][i]), scores["energy"][i]
            per["pointing_all"][pair["class"]].append(hit)
            per["energy_all"][pair["class"]].append(energy)
            if with_difficult and pair["difficult"]:
                per["pointing_difficult"][pair["class"]].append(hit)
                per["energy_difficult"][pair["class"]].append(energy)
    return per


@dataclass
class PointingGameTask(Task):
    """Every class present in an image explained in one batch by every row (the center baseline, the method,
    the method with UCAG); per pair, the pointing hit (``tolerance`` px) and the energy inside the boxes.

    ``dataset``: the opened VOC07/COCO14 dataset; ``entries``: its images to evaluate; ``header``: the summary's
    first entries (dataset, model, method); ``flags``: the difficult list (image id -> a flag per class), None
    without one; ``unlisted``, ``aggregation``: :func:`evaluation.pointing.in_difficult_subset`'s and
    :func:`evaluation.pointing.pointing_accuracy`'s rules."""

    dataset: VOC2007 | COCO2014
    entries: Sequence[ImageEntry]
    rows: Sequence[Row]
    spec: ModelSpec
    device: torch.device
    header: dict
    tolerance: int
    aggregation: str
    unlisted: str
    flags: Mapping[str, Sequence[bool]] | None = None
    description: str = "pointing"

    @property
    def items(self) -> Sequence[ImageEntry]:
        return self.entries

    @property
    def with_difficult(self) -> bool:
        return self.flags is not None

    @property
    def categories(self) -> Sequence[str]:
        return self.dataset.categories

    def key(self, item: ImageEntry) -> str:
        return item.key

    def load(self, item: ImageEntry) -> dict:
        return load_entry(self.dataset, item)

    def running(self) -> RunningText:
        return RunningMeans(("hit",), digits=1, scale=100, unit="%")  # each row's hit rate over pairs so far

    def shape(self) -> dict:
        return {"rows": [row.name for row in self.rows], "lists": ("hit", "energy"), "keys": ("file", "pairs"),
                "unscored": "pairs"}

    def unlisted_count(self) -> int:
        """How many of the entries the difficult list does not name (0 without a list)."""
        return 0 if self.flags is None else sum(entry.key not in self.flags for entry in self.entries)

    def process(self, batch: list[dict]) -> list[dict]:
        return [self.process_image(record) for record in batch]

    def process_image(self, record: dict) -> dict:
        """Every class present in the image explained in one batch, by every row; hits and energies per class.
        Maps are resized to the image as TorchRay does (plain bilinear); the center baseline points at
        TorchRay's exact centre."""
        image, targets = record["image"], record["targets"]
        height, width = image.shape[:2]
        pairs = [{"class": t.label, "difficult": None if self.flags is None else
                  in_difficult_subset(self.flags, record["key"], t.label, self.unlisted)} for t in targets]
        result = {"key": record["key"], "file": display_path(record["entry"].path), "pairs": pairs, "rows": {}}
        if not targets:
            return result
        x = preprocess_one(image, self.spec, self.device).expand(len(targets), -1, -1, -1)
        labels = torch.tensor([t.label for t in targets], device=self.device)
        for row, explanation, _ in explain_rows(self.rows, x, labels):
            # to the host once per row: the per-class points, hits and energies below each read values back
            maps = row.explainer.finalize(explanation.maps, (height, width), antialias=False)[:, 0].cpu()
            hits = [pointing_hit(t.mask, explainer_point(row.explainer, maps[i]), self.tolerance)
                    for i, t in enumerate(targets)]
            energies = [energy_score(maps[i], t.boxes) for i, t in enumerate(targets)]
            result["rows"][row.name] = {"hit": hits, "energy": energies}
        return result

    def row_summary(self, records: Collection[dict], row: Row) -> dict:
        """A row's pointing accuracy (``aggregation`` over classes) and class-mean energy (%), for all pairs and
        for the difficult subset (NaN without a difficult list)."""
        per = aggregate(records, row.name, len(self.categories), self.with_difficult)
        entry = {"name": row.name, "ucag": row.ucag}
        for name in FIELDS:
            if not self.with_difficult and name.endswith("difficult"):
                entry[name] = float("nan")
            elif name.startswith("pointing"):
                entry[name] = pointing_accuracy(per[name], len(self.categories), self.aggregation) * 100
            else:
                entry[name] = class_mean(per[name]) * 100
        return entry

    def summarize(self, records: Collection[dict]) -> dict:
        if not any(r["pairs"] for r in records):
            raise EvaluationError(f"none of the {len(records)} evaluated image(s) has a class to point at "
                                  "(every object 'difficult' or none annotated); the table would be empty")
        return {**self.header, "n_images": len(records), "n_pairs": sum(len(r["pairs"]) for r in records),
                "tolerance": self.tolerance, "aggregation": self.aggregation,
                "rows": [self.row_summary(records, row) for row in self.rows]}

    def write(self, out: Path, records: Collection[dict], skipped: list[dict], summary: dict) -> None:
        """per_class.csv, skipped.txt, summary.json and table.md (printed too)."""
        self.write_per_class(out / "per_class.csv", records)
        write_skipped(out / "skipped.txt", skipped)
        write_summary(out / "summary.json", summary)
        write_text(out / "table.md", pointing_tables(summary))
        print(pointing_tables(summary))

    def write_per_class(self, path: Path, records: Collection[dict]) -> None:
        """Per class: its pairs (all, difficult) and each row's mean hit and energy (%)."""
        names = [row.name for row in self.rows]
        per_row = {name: aggregate(records, name, len(self.categories), self.with_difficult) for name in names}
        with open_report(path) as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "name", "pairs_all", "pairs_difficult"] +
                            [f"{name}_{field}" for name in names for field in FIELDS])
            for c, name in enumerate(self.categories):
                first = per_row[names[0]]
                line = [c, name, len(first["pointing_all"][c]), len(first["pointing_difficult"][c])]
                for row_name in names:
                    line += [f"{100 * np.mean(v):.2f}" if (v := per_row[row_name][field][c]) else ""
                             for field in FIELDS]
                writer.writerow(line)
