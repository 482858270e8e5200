"""Resumable results: each rank appends one JSON line per image to ``parts/part-<rank>.jsonl`` after
every batch (flushed and synced), so a killed run loses at most the batch in flight; a rerun with the
same output folder skips every image already recorded; rank 0 merges the parts at the end."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from evaluation.errors import StoreError


class ResultStore:
    def __init__(self, out: Path, rank: int = 0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.path = self.parts / f"part-{rank}.jsonl"

    def check_config(self, config: dict, is_main: bool) -> None:
        """Refuse to mix results of different settings in one folder; rank 0 records the settings."""
        path = self.out / "run.json"
        if path.exists():
            recorded = json.loads(path.read_text())
            changed = {k: (recorded.get(k), v) for k, v in config.items() if recorded.get(k) != v}
            if changed:
                detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
                raise StoreError(f"{self.out} holds results of other settings ({detail}); use another --out")
        elif is_main:
            partial = path.with_suffix(".json.tmp")
            partial.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            os.replace(partial, path)  # other ranks never see a half-written file

    def records(self) -> list[dict]:
        """Every complete record of every part (a line cut short by a crash is ignored)."""
        records = []
        for part in sorted(self.parts.glob("part-*.jsonl")):
            for line in part.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def done(self) -> set[str]:
        return {record["key"] for record in self.records()}

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        if not lines:
            return
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a line cut short by a crash: start a fresh one
                    lines = "\n" + lines
            handle.write(lines.encode())
            handle.flush()
            os.fsync(handle.fileno())

    def merged(self) -> tuple[list[dict], list[dict]]:
        """(results, skipped) with one record per image (the first written wins), sorted by key."""
        unique: dict[str, dict] = {}
        for record in self.records():
            unique.setdefault(record["key"], record)
        ordered = [unique[key] for key in sorted(unique)]
        return [r for r in ordered if "skipped" not in r], [r for r in ordered if "skipped" in r]
