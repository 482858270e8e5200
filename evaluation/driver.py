"""The one evaluation driver every metric script runs.

A :class:`Task` says what a metric contributes (items, how to decode one, how to score a decoded batch
over the table's rows, how to summarise and write the results); :func:`run_task` does the rest, the same
for every metric: the items not yet in the store are split across torchrun ranks, decoded by DataLoader
workers (an unreadable item becomes a skip record), scored in batches and appended to the store after
every batch; rank 0 merges the parts, summarises and writes the report.

Rows are ``(name, explainer)`` pairs (:class:`Row`): the method, the method with UCAG (``name*``) and,
for the pointing game, the center baseline. Each row's final map is its explainer's own
:meth:`methods.base.Explainer.finalize`, so every metric sees the same maps.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.images import display_path
from evaluation.data import ImageFiles, ignore_interrupts, start_batches
from evaluation.datasets import Sample
from evaluation.distributed import Dist
from evaluation.errors import EvaluationError, StoreError
from evaluation.reports import write_skipped
from evaluation.store import ResultStore
from methods.base import Explainer, Explanation
from models import ModelSpec, preprocess
from ucag import UCAG


@dataclass(frozen=True)
class Row:
    """One line of a results table: its name ('gradcam'; 'gradcam*' with UCAG; 'center') and explainer."""

    name: str
    explainer: Explainer
    ucag: bool = False

    def explain(self, x: torch.Tensor, targets: torch.Tensor | None, logits: torch.Tensor | None = None) -> Explanation:
        """The row's explanation of ``x``. ``logits``: the model's logits for ``x`` from an earlier row of the
        same batch; a UCAG row then skips its forward of the whole images (its crops are unchanged)."""
        if logits is not None and isinstance(self.explainer, UCAG):
            blend = self.explainer.blend
            return self.explainer.explain_blends(x, targets, (blend,), logits=logits)[blend]
        return self.explainer(x, targets)


def _no_running_text(records: list[dict]) -> str:
    return ""


@dataclass
class Task:
    """What a metric contributes to :func:`run_task`.

    items: everything to evaluate; key(item): its unique, stable id (the resume key).
    load(item): the decoded item as a dict with 'key' ('error' when it cannot be read; runs in workers).
    process(batch): the decoded batch -> one JSON-able record per item, each with 'key'.
    summarize(records): every record of the run -> the summary (summary.json).
    write(out, records, skipped, summary): the report files.
    running(records): the progress bar's running figures.
    """

    items: Sequence[Any]
    key: Callable[[Any], str]
    load: Callable[[Any], dict]
    process: Callable[[list[dict]], list[dict]]
    summarize: Callable[[list[dict]], dict]
    write: Callable[[Path, list[dict], list[dict], dict], None]
    running: Callable[[list[dict]], str] = _no_running_text
    desc: str = "evaluating"


class _Items(Dataset):
    def __init__(self, items: Sequence[Any], load: Callable[[Any], dict]):
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.items[index])


def _as_list(records: list[dict]) -> list[dict]:
    return records


def _shut_down(batches) -> None:
    """Stop the loader's worker processes now (on an error or an interrupt too), not when the iterator is
    garbage-collected."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def run_task(task: Task, store: ResultStore, dist: Dist, batch_size: int, workers: int,
             on_batch: Callable[[int], None] | None = None,
             compute: Callable[[], AbstractContextManager] = nullcontext, pin_memory: bool = False) -> dict | None:
    """Evaluate this rank's share of the items ``store`` does not hold yet (earlier skips are tried again);
    on rank 0 merge the records of exactly these items, summarise and write the report. Returns the summary
    on rank 0 (None elsewhere). ``compute``: the region every batch is processed in (the precision's
    autocast, :mod:`common.precision`). ``pin_memory``: the loader puts the items' tensors in page-locked
    memory (GPU runs; ``load_sample`` gives the pixels as a tensor)."""
    done, failed = store.status()
    dist.barrier()  # every rank reads the same done-set before any rank appends to it
    # items never tried first, earlier skips retried last: a resumed run batches its new items as an
    # uninterrupted one would (batch composition can change the last bits of a score)
    fresh = [item for item in task.items if task.key(item) not in done and task.key(item) not in failed]
    pending = dist.shard(fresh + [item for item in task.items if task.key(item) in failed])
    loader = DataLoader(_Items(pending, task.load), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_as_list, worker_init_fn=ignore_interrupts if workers else None,
                        pin_memory=pin_memory)
    records: list[dict] = []
    bar = tqdm(total=len(pending), unit="img", desc=task.desc, disable=not dist.is_main)
    batches = start_batches(loader)
    try:
        for number, batch in enumerate(batches):
            skipped = [{"key": r["key"], "skipped": r["error"]} for r in batch if r.get("error")]
            for record in skipped:
                tqdm.write(f"skipped {display_path(record['key'])}: {display_path(record['skipped'])}")
            good = [r for r in batch if not r.get("error")]
            with compute():
                new = task.process(good) if good else []
            store.append(skipped + new)
            records.extend(new)
            bar.update(len(batch))
            bar.set_postfix_str(task.running(records), refresh=False)
            if on_batch is not None:
                on_batch(number)
    finally:
        _shut_down(batches)
        bar.close()
    dist.barrier()
    if not dist.is_main:
        return None
    results, skipped = store.merged({task.key(item) for item in task.items})
    try:
        if not results:
            write_skipped(store.out / "skipped.txt", skipped)
            raise EvaluationError(f"no image could be evaluated ({len(skipped)} skipped, "
                                  f"see {display_path(str(store.out))}/skipped.txt)")
        summary = task.summarize(results)
        task.write(store.out, results, skipped, summary)
    except OSError as exc:  # a report file the metric writes itself (curves.png): disk full, ...
        raise StoreError(f"cannot write the report in {display_path(str(store.out))}: {exc.strerror or exc}; "
                         "the records in parts/ are kept, rerun to write it") from None
    return summary


# ---- metrics over whole images (insertion/deletion, map density) ----------------------------------------

# metric(model, images, maps01 (B,1,H,W), targets) -> {field: (B,) tensor or (B, K) curves}
ImageMetric = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict]


def load_sample(sample: Sample) -> dict:
    """Decode one ImageNet-style sample (in a DataLoader worker); an unreadable file becomes an error."""
    record = ImageFiles([sample.path], tensors=True)[0]
    return {"key": sample.key, "sample": sample, "image": record.image, "pixels": record.pixels, "error": record.error}


def image_targets(model: torch.nn.Module, x: torch.Tensor, labels: Sequence[int | None], mode: str) -> torch.Tensor:
    """The class each image is explained for: its ground-truth label ('gt') or the model's prediction ('pred')."""
    if mode == "gt":
        return torch.tensor(labels, device=x.device)
    with torch.no_grad():
        return model(x).argmax(dim=1)


def running_means(fields: Sequence[str], digits: int = 1) -> Callable[[list[dict]], str]:
    """The progress bar's text: each row's running mean of ``fields`` so far, e.g. 'gradcam 12.3/45.6'."""

    def text(records: list[dict]) -> str:
        if not records:
            return ""
        return ", ".join(name + " " + "/".join(
            f"{np.nanmean([r['rows'][name][f] for r in records]):.{digits}f}" for f in fields)
            for name in records[0]["rows"])

    return text


def row_means(records: list[dict], rows: Sequence[Row], fields: Sequence[str]) -> list[dict]:
    """Mean of each scalar field over images, per row (NaN values left out)."""
    summary = []
    for row in rows:
        entry = {"name": row.name, "ucag": row.ucag}
        for name in fields:
            values = np.array([r["rows"][row.name][name] for r in records if row.name in r["rows"]], dtype=float)
            values = values[np.isfinite(values)]
            entry[name] = float(values.mean()) if values.size else float("nan")
        summary.append(entry)
    return summary


@dataclass
class ImageMetricTask:
    """A per-image metric over ImageNet-style samples: each row's [0, 1] maps at the model's input size go to
    ``metric`` with the batch and its targets; the summary holds each field's mean per row."""

    samples: Sequence[Sample]
    spec: ModelSpec
    device: torch.device
    rows: Sequence[Row]
    metric: ImageMetric
    fields: Sequence[str]
    target_mode: str
    header: dict = field(default_factory=dict)

    def process(self, batch: list[dict]) -> list[dict]:
        x = preprocess([r["image"] if r.get("pixels") is None else r["pixels"] for r in batch], self.spec,
                       self.device)
        targets = image_targets(self.spec.model, x, [r["sample"].label for r in batch], self.target_mode)
        size = tuple(x.shape[-2:])
        scores, logits = {}, None
        for row in self.rows:
            explanation = row.explain(x, targets, logits)
            logits = explanation.logits
            scores[row.name] = self.metric(self.spec.model, x, row.explainer.finalize(explanation.maps, size), targets)
        # every tensor comes to the host once (one copy per field), not once per image
        host = {name: {f: values.tolist() for f, values in fields.items()} for name, fields in scores.items()}
        classes = targets.tolist()
        return [{"key": r["key"], "file": display_path(r["sample"].path), "target": classes[i],
                 "rows": {name: {f: values[i] for f, values in fields.items()} for name, fields in host.items()}}
                for i, r in enumerate(batch)]

    def summarize(self, records: list[dict]) -> dict:
        return {**self.header, "n_images": len(records), "rows": row_means(records, self.rows, self.fields)}

    def task(self, write: Callable[[Path, list[dict], list[dict], dict], None],
             running: Callable[[list[dict]], str], desc: str) -> Task:
        return Task(self.samples, lambda s: s.key, load_sample, self.process, self.summarize, write, running, desc)
