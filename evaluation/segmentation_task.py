"""ImageNet segmentation (paper Table 4) as one :class:`SegmentationTask`: each row's final map of the predicted
class at the model's input size, thresholded and scored against the mask (:mod:`evaluation.segmentation_metrics`)."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.reports import write_segmentation_report
from evaluation.rows import Row, batch_targets, explain_rows
from evaluation.segmentation_metrics import image_scores
from evaluation.task import RunningMeans, RunningText, Task
from models import ModelSpec, preprocess


@dataclass
class SegmentationTask(Task):
    """Pixel accuracy (correct / labelled pixels over the dataset) and mAP (mean over images of the AP) of each
    row's maps. ``keys``: the dataset's images to evaluate; ``header``: the summary's first entries (model,
    method); ``protocol``: the AP's, 'map' (of the map's values) or 'agf' (of the thresholded output)."""

    dataset: ImageNetSegmentation
    keys: Sequence[str]
    rows: Sequence[Row]
    spec: ModelSpec
    device: torch.device
    header: dict
    protocol: str = "map"
    description: str = "segmentation"

    @property
    def items(self) -> Sequence[str]:
        return self.keys

    def key(self, item: str) -> str:
        return item

    def load(self, item: str) -> dict:
        return self.dataset.load(item)

    def running(self) -> RunningText:
        return RunningMeans(("ap",), digits=3, label="mAP ")

    def shape(self) -> dict:
        return {"rows": [row.name for row in self.rows], "fields": ("correct", "labelled", "ap"),
                "keys": ("file", "target")}

    def process(self, batch: list[dict]) -> list[dict]:
        """The predicted class of each image explained by every row (x's logits computed once for all rows); the
        row's final maps at the input size (:meth:`evaluation.rows.Row.final`) scored against the masks."""
        x = preprocess([r["image"] for r in batch], self.spec, self.device)
        size = tuple(x.shape[-2:])
        masks = torch.stack([F.interpolate(torch.from_numpy(r["mask"]).float()[None, None], size=size,
                                           mode="nearest")[0, 0] for r in batch]).to(self.device)
        targets, logits = batch_targets(self.spec.model, x, None)
        source = self.dataset.path.name
        results = [{"key": r["key"], "file": f"{source}#{r['key']}", "target": int(targets[i]), "rows": {}}
                   for i, r in enumerate(batch)]
        for row, explanation, _ in explain_rows(self.rows, x, targets, logits):
            maps = row.final(explanation.maps, size)[:, 0]
            correct, labelled, aps = image_scores(maps, masks, row.explainer.signed, self.protocol)
            for i, result in enumerate(results):
                result["rows"][row.name] = {"correct": int(correct[i]), "labelled": int(labelled[i]), "ap": aps[i]}
        return results

    def row_summary(self, records: Collection[dict], row: Row) -> dict:
        """Pixel accuracy over the dataset's labelled pixels; mAP = mean over images of the AP."""
        values = [r["rows"][row.name] for r in records]
        correct, labelled = sum(v["correct"] for v in values), sum(v["labelled"] for v in values)
        aps = np.array([v["ap"] for v in values], dtype=float)
        return {"name": row.name, "ucag": row.ucag, "pixel_accuracy": correct / max(labelled, 1),
                "map": float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")}

    def summarize(self, records: Collection[dict]) -> dict:
        return {**self.header, "n_images": len(records), "ap": self.protocol,
                "rows": [self.row_summary(records, row) for row in self.rows]}

    def write(self, out: Path, records: Collection[dict], skipped: list[dict], summary: dict) -> None:
        write_segmentation_report(out, records, skipped, summary)
