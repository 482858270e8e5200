"""The evaluation driver's own cost at ImageNet scale: per-batch time and peak memory of a fresh run, a resume
and the merge, with N = 1k, 10k and 50k records in the store's exact format (insdel records of two rows, their
AUCs and both curves), the model's work left out (the task's process fabricates the records at once).

    python benchmarks/driver_scale.py                      # N = 1000, 10000, 50000
    python benchmarks/driver_scale.py --sizes 1000 --batch-size 8

Each scenario runs in its own process, so its peak RSS (ru_maxrss) is its own:
- fresh: run_task over N new items (every batch appended and synced, the progress text updated, the merge and
  the report: per_image.csv, summary.json, table.md, curves.png);
- resume: the same folder with the N records done and one batch of new items;
- per batch: the median driver time of the run's last 10 % of batches (where a cost growing with the records
  written so far would show) and of its first 10 %.
Targets (issue 20): the per-batch cost at 50k within 10 % of its cost at 1k, a resume's peak RSS within 80 MiB of
a fresh run's.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.allocator import keep_freed_memory  # noqa: E402
from evaluation.distributed import Dist  # noqa: E402
from evaluation.driver import run_task  # noqa: E402
from evaluation.image_metric import row_means  # noqa: E402
from evaluation.reports import write_insdel_report  # noqa: E402
from evaluation.rows import Row  # noqa: E402
from evaluation.store import ResultStore  # noqa: E402
from evaluation.task import RunningMeans, Task  # noqa: E402

ROWS = ("gradcam", "gradcam*")
FIELDS = ("deletion", "insertion")
POINTS = 29  # ceil(224 * 224 / (224 * 8)) + 1


class _Named:
    """A Row stand-in: row_means reads its name and ucag flag only."""

    def __init__(self, name: str):
        self.name, self.ucag = name, name.endswith("*")


def fabricated(key: str, rng: np.random.Generator) -> dict:
    """One insdel record as ImageMetricTask writes it (two rows, AUCs x100 and curves of 29 points)."""
    rows = {}
    for name in ROWS:
        curves = rng.random((2, POINTS)).tolist()
        rows[name] = {"deletion": float(rng.random() * 100), "insertion": float(rng.random() * 100),
                      "deletion_curve": curves[0], "insertion_curve": curves[1]}
    return {"key": key, "file": f"val/{key}.JPEG", "target": int(rng.integers(1000)), "rows": rows}


class FabricatedTask(Task):
    """insdel's records fabricated (no model): the driver's and the store's own cost."""

    description = "driver"

    def __init__(self, keys: list[str], times: list[float]):
        self.keys, self.times = keys, times
        self.rng = np.random.default_rng(0)
        self.rows: list[Row] = [_Named(name) for name in ROWS]  # type: ignore[list-item]

    @property
    def items(self) -> list[str]:
        return self.keys

    def key(self, item: str) -> str:
        return item

    def load(self, item: str) -> dict:
        return {"key": item}

    def process(self, batch: list[dict]) -> list[dict]:
        return [fabricated(r["key"], self.rng) for r in batch]

    def summarize(self, records) -> dict:
        return {"model": "resnet50", "method": "gradcam", "target": "gt", "step": 1792, "n_images": len(records),
                "rows": row_means(records, self.rows, FIELDS)}

    def write(self, out, records, skipped, summary) -> None:
        stamp = time.perf_counter()
        write_insdel_report(out, records, skipped, summary)
        self.times.append(time.perf_counter() - stamp)

    def running(self) -> RunningMeans:
        return RunningMeans(FIELDS, 1)

    def shape(self) -> dict:
        return {"rows": list(ROWS), "fields": FIELDS, "lists": ("deletion_curve", "insertion_curve"),
                "keys": ("file", "target")}


def child(scenario: str, size: int, folder: Path, batch_size: int) -> dict:
    """One scenario in this process: its per-batch times, merge time and peak RSS."""
    keep_freed_memory()
    keys = [f"n{i // 50:08d}/ILSVRC2012_val_{i:08d}" for i in range(size)]
    if scenario == "resume":
        keys += [f"new/{i:08d}" for i in range(batch_size)]
    report_times: list[float] = []
    task = FabricatedTask(keys, report_times)
    store = ResultStore(folder)
    stamps = [time.perf_counter()]
    started = time.perf_counter()
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        run_task(task, store, Dist(), batch_size, 0, on_batch=lambda number: stamps.append(time.perf_counter()))
    total = time.perf_counter() - started
    per_batch = np.diff(stamps)
    tenth = max(1, len(per_batch) // 10)
    return {"scenario": scenario, "records": size, "batches": len(per_batch), "total_s": total,
            "first_batches_ms": 1000 * float(np.median(per_batch[:tenth])),
            "last_batches_ms": 1000 * float(np.median(per_batch[-tenth:])),
            "report_s": report_times[0] if report_times else float("nan"),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(scenario: str, size: int, folder: Path, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--child", scenario, "--sizes", str(size), "--dir", str(folder),
               "--batch-size", str(batch_size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="records per run, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.child:
        print(json.dumps(child(args.child, sizes[0], Path(args.dir), args.batch_size)))
        return
    print(f"{'records':>8} {'scenario':>8} {'batches':>8} {'first ms/batch':>15} {'last ms/batch':>14} "
          f"{'report s':>9} {'total s':>8} {'peak RSS MiB':>13}")
    results = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="driver-scale-") as folder:
            for scenario in ("fresh", "resume"):
                result = run_child(scenario, size, Path(folder), args.batch_size)
                results[(size, scenario)] = result
                print(f"{size:>8} {scenario:>8} {result['batches']:>8} {result['first_batches_ms']:>15.3f} "
                      f"{result['last_batches_ms']:>14.3f} {result['report_s']:>9.2f} {result['total_s']:>8.2f} "
                      f"{result['peak_rss_mib']:>13.0f}", flush=True)
    small, large = min(sizes), max(sizes)
    ratio = results[(large, "fresh")]["last_batches_ms"] / results[(small, "fresh")]["last_batches_ms"]
    extra = results[(large, "resume")]["peak_rss_mib"] - results[(large, "fresh")]["peak_rss_mib"]
    print(f"per-batch cost at {large} records / at {small}: {ratio:.2f} (target <= 1.10); resume peak RSS - fresh "
          f"at {large}: {extra:+.0f} MiB (target <= 80)")


if __name__ == "__main__":
    main()
