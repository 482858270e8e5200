"""The resumable, sharded loop every evaluation script runs: items not yet in the store are split across
torchrun ranks, decoded by DataLoader workers (a bad item becomes a record with an error), processed in
batches, and their results appended to the store after every batch."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from evaluation.distributed import Dist
from evaluation.store import ResultStore


class Items(Dataset):
    """Wraps ``load(item) -> dict`` (with 'key', and 'error' when the item cannot be read)."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], dict]):
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.load(self.items[index])


def _as_list(records: list[dict]) -> list[dict]:
    return records


def sharded_loop(items: Sequence[Any], key: Callable[[Any], str], load: Callable[[Any], dict],
                 process: Callable[[list[dict]], list[dict]], store: ResultStore, dist: Dist, batch_size: int,
                 workers: int, desc: str, running: Callable[[list[dict]], str],
                 on_batch: Callable[[int], None] | None = None) -> None:
    """Run ``process`` over this rank's share of the items that ``store`` does not hold yet."""
    done = store.done()
    dist.barrier()  # every rank reads the same done-set before any rank appends to it
    pending = dist.shard([item for item in items if key(item) not in done])
    loader = DataLoader(Items(pending, load), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_as_list)
    results: list[dict] = []
    bar = tqdm(total=len(pending), unit="img", desc=desc, disable=not dist.is_main)
    for number, batch in enumerate(loader):
        skipped = [{"key": r["key"], "skipped": r["error"]} for r in batch if r.get("error")]
        for record in skipped:
            tqdm.write(f"skipped {record['key']}: {record['skipped']}")
        good = [r for r in batch if not r.get("error")]
        new = process(good) if good else []
        store.append(skipped + new)
        results.extend(new)
        bar.update(len(batch))
        bar.set_postfix_str(running(results), refresh=False)
        if on_batch is not None:
            on_batch(number)
    bar.close()
