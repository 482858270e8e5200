"""The loop shared by the evaluation scripts: data -> maps of every row (method, method+UCAG) -> metric ->
results appended per batch; resumable, sharded under torchrun, with a progress bar of running means."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from app.cli import Setup
from evaluation.data import ImageFiles
from evaluation.datasets import Sample
from evaluation.distributed import Dist
from evaluation.loop import sharded_loop
from evaluation.store import ResultStore
from methods import finalize_maps
from models import preprocess

# metric(model, images, maps01 (B,1,H,W), targets) -> {field: (B,) tensor or (B, K) curves}
Metric = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict]


@dataclass(frozen=True)
class Row:
    """One line of a results table: a method, with or without UCAG."""

    name: str
    ucag: bool


def table_rows(setup: Setup) -> list[Row]:
    rows = [Row(setup.method, False)]
    if setup.ucag is not None:
        rows.append(Row(f"{setup.method}*", True))
    return rows


def row_maps(setup: Setup, row: Row, x: torch.Tensor, targets: torch.Tensor, official_alpha: float) -> torch.Tensor:
    """[0, 1] maps at the model's input size for one row."""
    size = tuple(x.shape[-2:])
    if row.ucag:
        return setup.ucag.finalize(setup.ucag(x, targets).maps, size)
    if setup.ucag is not None and setup.ucag.official and official_alpha != 1:
        # the official code's baseline for alpha != 1: the explainer on the whole image upscaled by alpha
        scaled = (int(size[0] * official_alpha), int(size[1] * official_alpha))
        x = F.interpolate(x, size=scaled, mode="bicubic", align_corners=False)
    return finalize_maps(setup.explainer(x, targets).maps, size)


def evaluate(samples: Sequence[Sample], setup: Setup, store: ResultStore, dist: Dist, metric: Metric,
             target_mode: str, batch_size: int, workers: int, alpha: float, desc: str,
             running: Callable[[list[dict]], str], on_batch: Callable[[int], None] | None = None) -> None:
    """Evaluate this rank's share of the ImageNet-style samples not yet in ``store``."""
    rows = table_rows(setup)

    def load(sample: Sample) -> dict:
        record = ImageFiles([sample.path])[0]
        return {"key": sample.key, "sample": sample, "image": record.image, "error": record.error}

    def process(batch: list[dict]) -> list[dict]:
        x = preprocess([r["image"] for r in batch], setup.spec, setup.device)
        if target_mode == "gt":
            targets = torch.tensor([r["sample"].label for r in batch], device=setup.device)
        else:
            with torch.no_grad():
                targets = setup.spec.model(x).argmax(dim=1)
        results = {row.name: metric(setup.spec.model, x, row_maps(setup, row, x, targets, alpha), targets)
                   for row in rows}
        return [{"key": r["key"], "file": str(r["sample"].path), "target": int(targets[i]),
                 "rows": {name: {field: values[i].tolist() for field, values in fields.items()}
                          for name, fields in results.items()}} for i, r in enumerate(batch)]

    sharded_loop(samples, lambda s: s.key, load, process, store, dist, batch_size, workers, desc, running, on_batch)


def row_means(results: list[dict], rows: list[Row], fields: Sequence[str]) -> list[dict]:
    """Mean of each scalar field over images per row (NaN values left out)."""
    summary = []
    for row in rows:
        entry = {"name": row.name, "ucag": row.ucag}
        for field in fields:
            values = np.array([r["rows"][row.name][field] for r in results if row.name in r["rows"]], dtype=float)
            values = values[np.isfinite(values)]
            entry[field] = float(values.mean()) if values.size else float("nan")
        summary.append(entry)
    return summary
