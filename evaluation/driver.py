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

import math
from collections.abc import Callable, Collection, Iterable, Sequence
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
from methods.postprocess import official_ranking_maps, zero_maps
from models import ModelSpec, preprocess
from ucag import UCAG
from ucag.framework import image_logits


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


class RunningText:
    """The progress bar's running figures: :meth:`add` takes each batch's new records once, :meth:`text`
    reads sums kept so far, so the cost per batch does not grow with the records of the run. This base
    shows nothing."""

    def add(self, records: Iterable[dict]) -> None:
        """Take in a batch's new records."""

    def text(self) -> str:
        return ""


class RunningMeans(RunningText):
    """Each row's running mean of ``fields`` (NaN left out; a list value counts each element), e.g.
    'gradcam 12.3/45.6'; ``scale``, ``label`` and ``unit`` shape it: 'gradcam mAP 0.512', 'center 61.2%'."""

    def __init__(self, fields: Sequence[str], digits: int = 1, scale: float = 1.0, label: str = "", unit: str = ""):
        self.fields, self.digits, self.scale, self.label, self.unit = tuple(fields), digits, scale, label, unit
        self.sums: dict[str, list[list[float]]] = {}  # row -> [sum, count] per field

    def add(self, records: Iterable[dict]) -> None:
        for record in records:
            for name, scores in record["rows"].items():
                sums = self.sums.setdefault(name, [[0.0, 0] for _ in self.fields])
                for total, name_of_field in zip(sums, self.fields, strict=True):
                    value = scores.get(name_of_field)
                    for item in value if isinstance(value, list) else [value]:
                        if isinstance(item, (int, float)) and not math.isnan(item):
                            total[0] += item
                            total[1] += 1

    def text(self) -> str:
        def mean(total: list[float]) -> str:
            return f"{self.scale * total[0] / total[1]:.{self.digits}f}{self.unit}" if total[1] else "-"
        return ", ".join(f"{name} {self.label}" + "/".join(mean(total) for total in sums)
                         for name, sums in self.sums.items() if any(total[1] for total in sums))


def running_means(fields: Sequence[str], digits: int = 1) -> RunningMeans:
    """The progress bar's text of insdel.py and density.py: each row's running mean of ``fields``."""
    return RunningMeans(fields, digits)


@dataclass
class Task:
    """What a metric contributes to :func:`run_task`.

    items: everything to evaluate; key(item): its unique, stable id (the resume key).
    load(item): the decoded item as a dict with 'key' ('error' when it cannot be read; runs in workers).
    process(batch): the decoded batch -> one JSON-able record per item, each with 'key'.
    summarize(records): every record of the run -> the summary (summary.json). ``records`` is a sized,
    re-iterable view streamed from the store (:class:`evaluation.store.StoredRecords`): iterate it, in as few
    passes as possible, rather than index it.
    write(out, records, skipped, summary): the report files (the same view).
    running: the progress bar's figures, fed each batch's new records once (:class:`RunningText`).
    shape: what a stored result must hold to belong to this run (rows, fields, lists, keys), see
    :func:`evaluation.store.check_record`: a folder holding other records is refused with file and line.
    """

    items: Sequence[Any]
    key: Callable[[Any], str]
    load: Callable[[Any], dict]
    process: Callable[[list[dict]], list[dict]]
    summarize: Callable[[Collection[dict]], dict]
    write: Callable[[Path, Collection[dict], list[dict], dict], None]
    running: RunningText = field(default_factory=RunningText)
    desc: str = "evaluating"
    shape: dict = field(default_factory=dict)


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
    store.expect(**task.shape)
    done, failed = store.status()
    dist.barrier()  # every rank reads the same done-set before any rank appends to it
    # items never tried first, earlier skips retried last: a resumed run batches its new items as an
    # uninterrupted one would (batch composition can change the last bits of a score)
    fresh = [item for item in task.items if task.key(item) not in done and task.key(item) not in failed]
    pending = dist.shard(fresh + [item for item in task.items if task.key(item) in failed])
    loader = DataLoader(_Items(pending, task.load), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_as_list, worker_init_fn=ignore_interrupts if workers else None,
                        pin_memory=pin_memory)
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
            bar.update(len(batch))
            if dist.is_main:  # only rank 0 shows a bar
                task.running.add(new)
                bar.set_postfix_str(task.running.text(), refresh=False)
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


def image_targets(model: torch.nn.Module, x: torch.Tensor, labels: Sequence[int | None],
                  mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the class each image is explained for, the logits of ``x`` when they were computed for it): its
    ground-truth label ('gt', no forward) or the model's prediction ('pred')."""
    if mode == "gt":
        return torch.tensor(labels, device=x.device), None
    logits = image_logits(model, x)
    return logits.argmax(dim=1), logits


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
    official_ranking: bool = False  # insdel --official: the raw maps of Explainer.official_raw methods
    lists: Sequence[str] = ()  # the metric's per-row list fields (insdel's curves), checked in stored records
    _warned: set = field(default_factory=set, init=False, repr=False)  # rows warned about an all-zero map

    def final_maps(self, row: Row, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The maps ``metric`` scores: the row's final [0, 1] maps, or under ``official_ranking`` the raw signed
        maps of the methods the official code ranks raw (its ucag() and baseline skip ReLU, min-max, blur)."""
        if self.official_ranking and row.explainer.official_raw:
            return official_ranking_maps(maps, size)
        return row.explainer.finalize(maps, size)

    def process(self, batch: list[dict]) -> list[dict]:
        x = preprocess([r["image"] if r.get("pixels") is None else r["pixels"] for r in batch], self.spec,
                       self.device)
        targets, logits = image_targets(self.spec.model, x, [r["sample"].label for r in batch], self.target_mode)
        size = tuple(x.shape[-2:])
        scores = {}
        for row in self.rows:
            explanation = row.explain(x, targets, logits)  # a UCAG row reuses the logits of x computed before it
            logits = explanation.logits
            final = self.final_maps(row, explanation.maps, size)
            scores[row.name] = {**self.metric(self.spec.model, x, final, targets), "zero_map": zero_maps(final)}
        # every tensor comes to the host once (one copy per field), not once per image
        host = {name: {f: values.tolist() for f, values in fields.items()} for name, fields in scores.items()}
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

    def task(self, write: Callable[[Path, Collection[dict], list[dict], dict], None], running: RunningText,
             desc: str) -> Task:
        shape = {"rows": [row.name for row in self.rows], "fields": self.fields, "lists": self.lists,
                 "keys": ("file", "target")}
        return Task(self.samples, lambda s: s.key, load_sample, self.process, self.summarize, write, running, desc,
                    shape)
