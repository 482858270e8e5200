"""Metrics over whole ImageNet-style images (insertion/deletion, map density) as one :class:`ImageMetricTask`:
each row's maps of a batch at the model's input size go to an :data:`ImageMetric` with the batch and its
targets; the summary holds each field's mean per row."""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.images import display_path
from evaluation.data import ImageFiles
from evaluation.datasets import Sample
from evaluation.reuse import ReusedBaseRow
from evaluation.rows import Row, batch_targets, explain_rows
from evaluation.task import RunningMeans, RunningText, Task
from methods.postprocess import official_ranking_maps, zero_maps
from models import ModelSpec, preprocess

# metric(model, images, maps01 (B,1,H,W), targets) -> {field: (B,) tensor or (B, K) curves}; a metric whose
# ``needs_keys`` is true also gets ``keys=`` the batch's item keys (ROAD seeds each image's noise by its key)
ImageMetric = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict]
# write(out, records, skipped, summary): a metric's report files (evaluation.reports)
ReportWriter = Callable[[Path, Collection[dict], list[dict], dict], None]


def load_sample(sample: Sample) -> dict:
    """Decode one ImageNet-style sample (in a DataLoader worker); an unreadable file becomes an error."""
    record = ImageFiles([sample.path], tensors=True)[0]
    return {"key": sample.key, "sample": sample, "image": record.image, "pixels": record.pixels, "error": record.error}



def row_means(records: Iterable[dict], rows: Sequence[Row], fields: Sequence[str],
              flags: Sequence[str] = ()) -> list[dict]:
    """Mean of each scalar field over images, per row (non-finite values left out), and for each of ``flags``
    (a per-row bool, e.g. 'zero_map') the number of images where it holds as '<flag>s' (None when a record
    written before the flag existed lacks it), in one pass."""
    sums = np.zeros((len(rows), len(fields)))
    counts = np.zeros((len(rows), len(fields)), dtype=np.int64)
    flagged = np.zeros((len(rows), len(flags)), dtype=np.int64)
    unrecorded = np.zeros((len(rows), len(flags)), dtype=bool)
    for record in records:
        scores = [record["rows"].get(row.name, {}) for row in rows]
        values = np.array([[score.get(name, math.nan) for name in fields] for score in scores], dtype=float)
        finite = np.isfinite(values)
        sums += np.where(finite, values, 0.0)
        counts += finite
        for i, score in enumerate(scores):
            for j, flag in enumerate(flags):
                if flag not in score:
                    unrecorded[i, j] = True
                elif score[flag]:
                    flagged[i, j] += 1
    return [{"name": row.name, "ucag": row.ucag,
             **{name: float(sums[i, j] / counts[i, j]) if counts[i, j] else float("nan")
                for j, name in enumerate(fields)},
             **{f"{flag}s": None if unrecorded[i, j] else int(flagged[i, j]) for j, flag in enumerate(flags)}}
            for i, row in enumerate(rows)]


@dataclass
class ImageMetricTask(Task):
    """A per-image metric over ImageNet-style samples: each row's [0, 1] maps at the model's input size go to
    ``metric`` with the batch and its targets; the summary holds each field's mean per row. ``report`` writes
    the report files, ``digits`` the progress bar's running means."""

    samples: Sequence[Sample]
    spec: ModelSpec
    device: torch.device
    rows: Sequence[Row]
    metric: ImageMetric
    fields: Sequence[str]
    target_mode: str
    header: dict = field(default_factory=dict)
    official_ranking: bool = False  # insdel --official: the raw maps of Explainer.official_raw methods
    lists: Sequence[str] = ()  # the metric's per-row list fields (insdel's curves), checked in stored records
    report: ReportWriter = field(kw_only=True)
    digits: int = field(default=1, kw_only=True)
    description: str = field(default="evaluating", kw_only=True)
    _warned: set = field(default_factory=set, init=False, repr=False)  # rows warned about an all-zero map
    reused: ReusedBaseRow | None = field(default=None, init=False, repr=False)  # --base-from

    def reuse_base(self, reused: ReusedBaseRow) -> None:
        """Take the base row's scores from another run where it has them for a whole batch (--base-from)."""
        self.reused = reused

    @property
    def items(self) -> Sequence[Sample]:
        return self.samples

    def key(self, item: Sample) -> str:
        return item.key

    def load(self, item: Sample) -> dict:
        return load_sample(item)

    def running(self) -> RunningText:
        return RunningMeans(self.fields, self.digits)

    def shape(self) -> dict:
        return {"rows": [row.name for row in self.rows], "fields": self.fields, "lists": self.lists,
                "keys": ("file", "target")}

    def final_maps(self, row: Row, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The maps ``metric`` scores: the row's final [0, 1] maps, or under ``official_ranking`` the raw signed
        maps of the methods the official code ranks raw (its ucag() and baseline skip ReLU, min-max, blur)."""
        if self.official_ranking and row.explainer.official_raw:
            return official_ranking_maps(maps, size)
        return row.explainer.finalize(maps, size)

    def process(self, batch: list[dict]) -> list[dict]:
        x = preprocess([r["image"] if r.get("pixels") is None else r["pixels"] for r in batch], self.spec,
                       self.device)
        labels = torch.tensor([r["sample"].label for r in batch], device=x.device) if self.target_mode == "gt" else None
        targets, logits = batch_targets(self.spec.model, x, labels)
        size = tuple(x.shape[-2:])
        stored = self.reused.scores([r["key"] for r in batch]) if self.reused is not None else None
        rows = self.rows if stored is None else [row for row in self.rows if row.name != self.reused.row]
        scores = {}
        for row, explanation, _ in explain_rows(rows, x, targets, logits):
            final = self.final_maps(row, explanation.maps, size)
            scored = (self.metric(self.spec.model, x, final, targets, keys=[r["key"] for r in batch])
                      if getattr(self.metric, "needs_keys", False) else self.metric(self.spec.model, x, final, targets))
            scores[row.name] = {**scored, "zero_map": zero_maps(final)}
        # every tensor comes to the host once (one copy per field), not once per image
        host = {name: {f: values.tolist() for f, values in fields.items()} for name, fields in scores.items()}
        if stored is not None:  # the base row as the other run stored it, in the table's row order
            host = {row.name: host[row.name] if row.name in host else
                    {f: [score[f] for score in stored] for f in stored[0]} for row in self.rows}
        classes = targets.tolist()
        self._note_zero_maps(host, batch)
        return [{"key": r["key"], "file": display_path(r["sample"].path), "target": classes[i],
                 "rows": {name: {f: values[i] for f, values in fields.items()} for name, fields in host.items()}}
                for i, r in enumerate(batch)]

    def _note_zero_maps(self, host: dict, batch: list[dict]) -> None:
        """Warn, once per row and run, when a final map is all zero (after the ReLU): it ranks pixels in raster
        order, a score of no explanation. summary.json counts them per row ('zero_maps')."""
        for name, fields in host.items():
            zero = [batch[i]["key"] for i, flag in enumerate(fields["zero_map"]) if flag]
            if zero and name not in self._warned:
                self._warned.add(name)
                tqdm.write(f"warning: {name}: the final map of {display_path(zero[0])} is all zero (nothing left "
                           "after the ReLU): its pixels are ranked in raster order; summary.json counts such maps "
                           "(zero_maps)")

    def summarize(self, records: Collection[dict]) -> dict:
        return {**self.header, "n_images": len(records),
                "rows": row_means(records, self.rows, self.fields, flags=("zero_map",))}

    def write(self, out: Path, records: Collection[dict], skipped: list[dict], summary: dict) -> None:
        self.report(out, records, skipped, summary)
