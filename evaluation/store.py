"""Resumable results: each rank appends one JSON line per image to ``parts/part-<rank>.jsonl`` after
every batch (flushed and synced), so a killed run loses at most the batch in flight; a rerun with the
same output folder skips every image already evaluated (skipped images are tried again); rank 0 merges
the parts of this invocation's images at the end.

The folder's ``run.json`` records the run's identity: every setting that can change a recorded number
(model, weights file hash, method and its options, UCAG geometry, labels file hash, metric settings and
version, device type and precision). A rerun whose identity differs is refused with the differing
settings named, unless it asks for a fresh start (the earlier results are then moved aside, not deleted).
A lock file (``.lock``, ``fcntl.flock``) held for the whole run refuses a second run on the same folder.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common.images import display_path
from evaluation.errors import StoreError

# Bump a metric's number whenever a change of its code changes the numbers it records: a folder holding
# records of another version is then refused instead of mixed with new ones.
METRIC_VERSIONS = {"insdel": 1, "density": 1, "pointing_game": 1, "segmentation": 1}
# The layout of the records in parts/ (2: skip records are retried, a later result supersedes them).
RECORD_FORMAT = 2
# run.json keys that describe a run without being part of its identity (paths of hashed files).
ABOUT = "about"
# Identity settings added after runs were first recorded, with the value every run.json written before them
# implies: such a run resumes under that value and is refused under any other.
IMPLIED_SETTINGS = {"blend": "constant", "deterministic": False}  # the paper's V(., Gamma) fold; no --deterministic


def file_sha256(path: str | Path) -> str:
    """'sha256:<hex>' of a file's content (read once, in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def check_output_folder(out: str | Path) -> Path:
    """Make sure ``out`` is (or can become) a writable folder, before any work: one-line errors for a path
    that is a file, lies under a file, cannot be created or is not writable."""
    out = Path(out)
    for ancestor in (out, *out.parents):
        if os.path.lexists(ancestor):
            if not ancestor.is_dir():
                where = "is a file" if ancestor == out else f"is under {display_path(str(ancestor))}, which is a file"
                raise StoreError(f"--out {display_path(str(out))} {where}; give a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the output folder {display_path(str(out))}: {_reason(exc)}") from None
    try:
        handle, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise StoreError(f"the output folder {display_path(str(out))} is not writable: {_reason(exc)}") from None
    return out


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a record is written, so an interrupt never cuts one short (the
    signal is delivered right after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _differences(recorded: dict, config: dict) -> list[str]:
    """'setting: old -> new' for every identity setting that differs (method options one by one)."""
    changed = []
    for key in sorted(set(recorded) | set(config)):
        if key == ABOUT:
            continue
        old, new = recorded.get(key), config.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            changed.append(f"{key}: {old!r} -> {new!r}")
    return changed


class ResultStore:
    def __init__(self, out: Path, rank: int = 0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.rank = rank
        self.path = self.parts / f"part-{rank}.jsonl"
        self._lock: int | None = None
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {display_path(str(self.parts))}: {_reason(exc)}") from None

    # ---- one run at a time -------------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold ``.lock`` (rank 0; ``.lock-<rank>`` for the other ranks of a torchrun) until :meth:`release`:
        a second run on the same folder is refused instead of doing the same work."""
        path = self.out / (".lock" if self.rank == 0 else f".lock-{self.rank}")
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip()
            os.close(handle)
            by = f" (pid {holder})" if holder else ""
            raise StoreError(f"{display_path(str(self.out))} is in use by another run{by}: wait for it to end or "
                             "use another --out") from None
        except OSError:
            os.close(handle)
            raise
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    # ---- identity --------------------------------------------------------------------------------------------

    def _read_config(self) -> dict | None:
        path = self.out / "run.json"
        if not path.exists():
            return None
        try:
            recorded = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as exc:
            raise StoreError(f"{display_path(str(path))}: not valid JSON (line {exc.lineno}: {exc.msg}); "
                             "repair it, or rerun with --fresh to move these results aside") from None
        if not isinstance(recorded, dict):
            raise StoreError(f"{display_path(str(path))}: not a settings object; repair it, or rerun with --fresh")
        return recorded

    def has_results(self) -> bool:
        return (self.out / "run.json").exists() or any(self.parts.glob("part-*.jsonl"))

    def start_fresh(self) -> Path | None:
        """Move the earlier run's run.json, parts and reports into ``replaced-<time>/`` inside the folder
        (nothing is deleted); returns where they went (None: nothing to move)."""
        if not self.has_results():
            return None
        aside = self.out / time.strftime("replaced-%Y%m%d-%H%M%S")
        number = 1
        while aside.exists():
            aside = self.out / f"{time.strftime('replaced-%Y%m%d-%H%M%S')}-{number}"
            number += 1
        aside.mkdir()
        for name in ["run.json", "parts", "summary.json", "per_image.csv", "per_class.csv", "table.md",
                     "curves.png", "skipped.txt"]:
            if os.path.lexists(self.out / name):
                os.replace(self.out / name, aside / name)
        self.parts.mkdir()
        return aside

    def check_config(self, config: dict, is_main: bool) -> None:
        """Refuse to mix results of different settings in one folder; rank 0 records the settings.

        ``config`` is the run's identity; its ``about`` entry (paths of hashed files) is recorded but not
        compared."""
        recorded = self._read_config()
        if recorded is not None:
            implied = {key: value for key, value in IMPLIED_SETTINGS.items() if key in config and key not in recorded}
            changed = _differences({**recorded, **implied}, config)
            if changed:
                raise StoreError(f"{display_path(str(self.out))} holds results of other settings "
                                 f"({', '.join(changed)}); "
                                 "use another --out, or --fresh to move them aside and start over")
        elif is_main:
            if any(self.parts.glob("part-*.jsonl")):
                raise StoreError(f"{display_path(str(self.out))} holds records but no run.json (their settings are "
                                 "unknown); use another --out, or --fresh to move them aside and start over")
            path = self.out / "run.json"
            partial = path.with_suffix(".json.tmp")
            self._write_file(partial, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            os.replace(partial, path)  # other ranks never see a half-written file

    # ---- records ---------------------------------------------------------------------------------------------

    def _part_records(self, part: Path) -> list[dict]:
        """The records of one part. A last line without its newline was cut short by a crash and is ignored;
        any other line that is not a record means a damaged file: an error naming it."""
        data = part.read_bytes()
        lines = data.split(b"\n")
        lines.pop()  # b"" when the file ends with a newline, else a line cut short by a crash
        records = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise StoreError(f"{display_path(str(part))}:{number}: not a JSON record "
                                 f"({getattr(exc, 'msg', exc)}); move the file aside or rerun with --fresh") from None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                raise StoreError(f"{display_path(str(part))}:{number}: a record without a 'key'; move the file aside "
                                 "or rerun with --fresh")
            records.append(record)
        return records

    def records(self) -> list[dict]:
        """Every complete record of every part, in the order written (part by part)."""
        return [record for part in sorted(self.parts.glob("part-*.jsonl")) for record in self._part_records(part)]

    def done(self) -> set[str]:
        """Keys evaluated already (skip records are not: a skipped image is tried again)."""
        return self.status()[0]

    def status(self) -> tuple[set[str], set[str]]:
        """(keys evaluated already, keys only skipped so far)."""
        records = self.records()
        done = {record["key"] for record in records if "skipped" not in record}
        return done, {record["key"] for record in records if "skipped" in record} - done

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        try:
            with open(path, "wb") as handle:
                ResultStore._write_bytes(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise StoreError(f"cannot write {display_path(str(path))}: {_reason(exc)}") from None

    @staticmethod
    def _write_bytes(handle, data: bytes) -> None:
        handle.write(data)

    def _cut_torn_tail(self, handle) -> None:
        """Drop a last line cut short by a crash (it holds no complete record), so appending after it never
        buries a broken line in the middle of the file."""
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        print(f"note: {display_path(str(self.path))}: ignored a record cut short by an earlier crash "
              f"({size - keep} bytes)")
        handle.truncate(keep)

    def append(self, records: Iterable[dict]) -> None:
        """Append the records as JSON lines (ASCII: other characters escaped), flushed and synced. A failed
        write (disk full) leaves the file as it was and is an error naming it."""
        lines = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        if not lines:
            return
        with deferred_signals(), open(self.path, "a+b") as handle:
            self._cut_torn_tail(handle)
            size = handle.seek(0, os.SEEK_END)
            try:
                self._write_bytes(handle, lines.encode("ascii"))
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as exc:
                try:  # take back a partly written batch: the records written before stay intact
                    handle.truncate(size)
                    os.fsync(handle.fileno())
                except OSError:
                    pass
                detail = "disk full" if exc.errno == errno.ENOSPC else _reason(exc)
                raise StoreError(f"cannot append to {display_path(str(self.path))}: {detail}; the records written "
                                 "before are kept, rerun to resume") from None

    def merged(self, keys: Collection[str] | None = None) -> tuple[list[dict], list[dict]]:
        """(results, skipped) with one record per image, sorted by key, for the images in ``keys`` (all when
        None). A result supersedes skip records of the same image (a file fixed since); among results the
        first written wins; an image never evaluated keeps its latest skip record."""
        results: dict[str, dict] = {}
        skipped: dict[str, dict] = {}
        for record in self.records():
            key = record["key"]
            if keys is not None and key not in keys:
                continue
            if "skipped" in record:
                skipped[key] = record
            else:
                results.setdefault(key, record)
        return ([results[key] for key in sorted(results)],
                [skipped[key] for key in sorted(skipped) if key not in results])
