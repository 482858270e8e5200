"""The one evaluation driver every metric script runs.

A :class:`evaluation.task.Task` says what a metric contributes (items, how to decode one, how to score a
decoded batch over the table's rows, how to summarise and write the results); :func:`run_task` does the
rest, the same for every metric: the items not yet in the store are split across torchrun ranks, decoded by
DataLoader workers (an unreadable item becomes a skip record), scored in batches and appended to the store
after every batch; rank 0 merges the parts, summarises and writes the report.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.images import display_path
from evaluation.data import ignore_interrupts, start_batches
from evaluation.distributed import Dist
from evaluation.errors import EvaluationError, StoreError
from evaluation.reports import write_skipped
from evaluation.store import ResultStore
from evaluation.task import Task


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
    store.expect(**task.shape())
    done, failed = store.status()
    dist.barrier()  # every rank reads the same done-set before any rank appends to it
    # items never tried first, earlier skips retried last: a resumed run batches its new items as an
    # uninterrupted one would (batch composition can change the last bits of a score)
    fresh = [item for item in task.items if task.key(item) not in done and task.key(item) not in failed]
    pending = dist.shard(fresh + [item for item in task.items if task.key(item) in failed])
    loader = DataLoader(_Items(pending, task.load), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_as_list, worker_init_fn=ignore_interrupts if workers else None,
                        pin_memory=pin_memory)
    bar = tqdm(total=len(pending), unit="img", desc=task.description, disable=not dist.is_main)
    running = task.running()
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
                running.add(new)
                bar.set_postfix_str(running.text(), refresh=False)
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
