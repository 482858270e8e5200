"""Resumable results: each rank appends one JSON line per image to ``parts/part-<rank>.jsonl`` after
every batch (flushed and synced), so a killed run loses at most the batch in flight; a rerun with the
same output folder skips every image already evaluated (skipped images are tried again); rank 0 merges
the parts of this invocation's images at the end.

The folder's ``run.json`` records the run's identity: every setting that can change a recorded number
(model, weights file hash, method and its options, UCAG geometry, labels file hash, metric settings and
version, device type and precision). A rerun whose identity differs is refused with the differing
settings named, unless it asks for a fresh start (the earlier results are then moved aside, not deleted).
A lock file (``.lock``, a POSIX record lock: ``fcntl.lockf``) held for the whole run refuses a second run on the
same folder. Unlike ``flock``, such a lock is not shared with forked children (DataLoader workers), and the
kernel drops it when its process dies, however it dies.
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
from contextlib import contextmanager, suppress
from pathlib import Path

from common.images import display_path
from evaluation.errors import StoreError

# Bump a metric's number whenever a change of its code changes the numbers it records: a folder holding
# records of another version is then refused instead of mixed with new ones.
METRIC_VERSIONS = {"insdel": 1, "density": 1, "pointing_game": 1, "segmentation": 1, "confidence": 1, "road": 1,
                   "sanity": 1}
# The layout of the records in parts/ (2: skip records are retried, a later result supersedes them).
RECORD_FORMAT = 2
# run.json keys that describe a run without being part of its identity (paths of hashed files).
ABOUT = "about"
# Identity settings added after runs were first recorded, with the value every run.json written before them
# implies: such a run resumes under that value and is refused under any other.
IMPLIED_SETTINGS = {
    "blend": "constant",  # UCAG's fold; only the paper's V(., Gamma) existed before
    "tie_order": "raster",  # insdel's order of equal saliencies; only the stable raster order existed before
    "deterministic": False,  # --deterministic did not exist before
    "smooth": None,  # --smooth did not exist before
    "smooth_seed": None,
    "input_scale": 1.0,  # the base row's upscaling of the whole image (--input-scale); none before the flag
}


def file_sha256(path: str | Path) -> str:
    """'sha256:<hex>' of a file's content (read once, in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


# (inode, device) of the lock files this process holds: POSIX locks do not exclude their own process.
_HELD: set[tuple[int, int]] = set()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HELD.clear)  # a forked child holds none of them


def _lock_key(file: Path | int) -> tuple[int, int] | None:
    """(inode, device) of a lock file (a path or a descriptor); None when there is no such file."""
    try:
        return tuple(os.stat(file)[1:3])
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    """Whether a process of this pid exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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


def identity_differences(recorded: dict, config: dict) -> list[str]:
    """The settings in which a recorded run.json and a run's identity differ (see :func:`_differences`); a
    setting the recorded run predates takes its implied value (IMPLIED_SETTINGS)."""
    implied = {key: value for key, value in IMPLIED_SETTINGS.items() if key in config and key not in recorded}
    return _differences({**recorded, **implied}, config)


def read_run_json(out: Path) -> dict | None:
    """A run folder's recorded identity (run.json), None when it has none; a damaged one is a StoreError."""
    path = Path(out) / "run.json"
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(record, part: Path, line: int, rows: Collection[str] | None = None, fields: Collection[str] = (),
                 lists: Collection[str] = (), keys: Collection[str] = (), unscored: str | None = None) -> None:
    """Refuse a record this run cannot use, as a StoreError '<part>:<line>: ...'. Every record is an object with a
    string 'key'; a skip record has a text 'skipped'; a result holds ``keys`` (e.g. 'file', 'target') and an object
    'rows' with every row of this run (``rows``: records of another method are refused, not counted done), each
    holding ``fields`` as numbers (NaN allowed) and ``lists`` as lists of numbers (``rows`` None: the rows held).
    ``unscored``: a key whose empty list marks a result with nothing to score (a pointing-game image without a
    class to point at), which holds no rows."""
    def refuse(problem: str) -> None:
        raise StoreError(f"{display_path(str(part))}:{line}: {problem}; move the file aside or rerun with --fresh")

    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        refuse("a record without a 'key'")
    if "skipped" in record:
        if not isinstance(record["skipped"], str):
            refuse(f"a skip record whose reason is not text ({_shown(record['skipped'])})")
        return
    missing = [repr(key) for key in keys if key not in record]
    if missing:
        refuse(f"a record without {', '.join(missing)}")
    held = record.get("rows")
    if not isinstance(held, dict):
        refuse("a record without 'rows'")
    if unscored is not None and record.get(unscored) == [] and not held:
        return
    absent = sorted(set(rows) - set(held)) if rows is not None else []
    if absent:
        refuse(f"a record without this run's row(s) {', '.join(absent)} (it holds {', '.join(sorted(held)) or 'none'}:"
               " results of another method?)")
    for name in sorted(held if rows is None else rows):
        values = held[name]
        if not isinstance(values, dict):
            refuse(f"row {name}: not an object ({_shown(values)})")
        for field in (*fields, *lists):
            if field not in values:
                refuse(f"row {name}: no {field}")
        for field in fields:
            if not _is_number(values[field]):
                refuse(f"row {name}: {field} is not a number ({_shown(values[field])})")
        for field in lists:
            value = values[field]
            if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
                refuse(f"row {name}: {field} is not a list of numbers ({_shown(value)})")


class ResultStore:
    def __init__(self, out: Path, rank: int = 0):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self.rank = rank
        self.path = self.parts / f"part-{rank}.jsonl"
        self._lock: int | None = None
        self._shape: dict = {}  # what a result record must hold (expect)
        self._lock_key: tuple[int, int] | None = None
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {display_path(str(self.parts))}: {_reason(exc)}") from None

    # ---- one run at a time -------------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold ``.lock`` (rank 0; ``.lock-<rank>`` for the other ranks of a torchrun) until :meth:`release`:
        a second run on the same folder is refused instead of doing the same work. The file holds the owner's
        pid while it runs; a pid left there by a run that was killed is noted and the lock taken over."""
        path = self.out / (".lock" if self.rank == 0 else f".lock-{self.rank}")
        if _lock_key(path) in _HELD:  # checked before opening: closing any descriptor of it would drop the lock
            raise StoreError(f"{display_path(str(self.out))} is in use by another run (pid {os.getpid()}, this "
                             "process): release it first or use another --out")
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the lock file {display_path(str(path))}: {_reason(exc)}") from None
        key = _lock_key(handle)
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip()
            os.close(handle)
            if not isinstance(exc, BlockingIOError) and exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise StoreError(f"cannot lock {display_path(str(path))}: {_reason(exc)}") from None
            by = f" (pid {holder})" if holder else ""
            raise StoreError(f"{display_path(str(self.out))} is in use by another run{by}: wait for it to end or "
                             "use another --out") from None
        try:
            earlier = os.pread(handle, 64, 0).decode(errors="replace").strip()
            os.ftruncate(handle, 0)
            os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(handle)
            raise StoreError(f"cannot write the lock file {display_path(str(path))}: {_reason(exc)}") from None
        if earlier.isdigit() and int(earlier) != os.getpid() and not _alive(int(earlier)):
            print(f"note: {display_path(str(path))} was left by pid {earlier}, which ended without releasing it "
                  "(killed?); taking it over")
        _HELD.add(key)
        self._lock, self._lock_key = handle, key

    def release(self) -> None:
        if self._lock is not None:
            # best effort: a pid left in the file only means a note on the next run (a run that did not end
            # normally); failing to clear it must not turn a finished run into an error
            with suppress(OSError):
                os.ftruncate(self._lock, 0)
            os.close(self._lock)  # closing the descriptor drops the lock
            _HELD.discard(self._lock_key)
            self._lock = None

    # ---- identity --------------------------------------------------------------------------------------------

    def _read_config(self) -> dict | None:
        return read_run_json(self.out)

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
            changed = identity_differences(recorded, config)
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

    @staticmethod
    def _lines(part: Path) -> Iterator[tuple[int, int, bytes]]:
        """(line number, byte offset, line) of each complete line of one part, read as a stream. A last line
        without its newline was cut short by a crash and is left out."""
        with open(part, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):
                    return
                yield number, offset, line
                offset += len(line)

    def expect(self, rows: Collection[str] | None = None, fields: Collection[str] = (), lists: Collection[str] = (),
               keys: Collection[str] = (), unscored: str | None = None) -> None:
        """What this run's results must hold to be counted done (see :func:`check_record`); a part holding
        another record is refused with its file and line when read."""
        self._shape = {"rows": rows, "fields": fields, "lists": lists, "keys": keys, "unscored": unscored}

    def _parse(self, part: Path, number: int, line: bytes) -> dict:
        """One line as a record of this run (:meth:`expect`); anything else means a damaged file or another
        run's records: an error naming the file and the line."""
        try:
            record = json.loads(line.decode("utf-8", "surrogateescape"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{display_path(str(part))}:{number}: not a JSON record "
                             f"({getattr(exc, 'msg', exc)}); move the file aside or rerun with --fresh") from None
        check_record(record, part, number, **self._shape)
        return record

    def _scan(self) -> Iterator[tuple[dict, Path, int, int, int]]:
        """(record, part, line number, offset, length) of every complete record, part by part, one line in
        memory at a time."""
        for part in sorted(self.parts.glob("part-*.jsonl")):
            for number, offset, line in self._lines(part):
                yield self._parse(part, number, line), part, number, offset, len(line)

    def records(self) -> Iterator[dict]:
        """Every complete record of every part, in the order written (part by part), streamed."""
        return (record for record, *_ in self._scan())

    def done(self) -> set[str]:
        """Keys evaluated already (skip records are not: a skipped image is tried again)."""
        return self.status()[0]

    def status(self) -> tuple[set[str], set[str]]:
        """(keys evaluated already, keys only skipped so far), streaming the parts: only the keys are kept. A
        record this run cannot use (:meth:`expect`) is an error naming its file and line, before any work."""
        done: set[str] = set()
        skipped: set[str] = set()
        for record, *_ in self._scan():
            (skipped if "skipped" in record else done).add(record["key"])
        return done, skipped - done

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        try:
            with open(path, "wb", buffering=0) as handle:  # unbuffered: no flush at close to fail a second time
                ResultStore._write_bytes(handle, data)
                os.fsync(handle.fileno())
        except OSError as exc:
            raise StoreError(f"cannot write {display_path(str(path))}: {_reason(exc)}") from None

    @staticmethod
    def _write_bytes(handle, data: bytes) -> None:
        """Write all of ``data`` to an unbuffered file (a raw write may take part of it)."""
        view = memoryview(data)
        while view:
            view = view[handle.write(view):]

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
        with deferred_signals():
            try:  # unbuffered: a failed write leaves nothing to flush at close, which would fail again and mask it
                handle = open(self.path, "a+b", buffering=0)
            except OSError as exc:
                raise StoreError(f"cannot append to {display_path(str(self.path))}: {_reason(exc)}") from None
            try:
                self._append_to(handle, lines.encode("ascii"))
            finally:
                with suppress(OSError):  # the records were synced (or the error is being raised already)
                    handle.close()

    def _append_to(self, handle, data: bytes) -> None:
        self._cut_torn_tail(handle)
        size = handle.seek(0, os.SEEK_END)
        try:
            self._write_bytes(handle, data)
            os.fsync(handle.fileno())
        except OSError as exc:
            # best effort: take back a partly written batch (the records written before stay intact); if even
            # that fails, the torn tail is cut on the next append (_cut_torn_tail) and the StoreError below stands
            with suppress(OSError):
                handle.truncate(size)
                os.fsync(handle.fileno())
            detail = "disk full" if exc.errno == errno.ENOSPC else _reason(exc)
            raise StoreError(f"cannot append to {display_path(str(self.path))}: {detail}; the records written "
                             "before are kept, rerun to resume") from None

    def merged(self, keys: Collection[str] | None = None) -> tuple[StoredRecords, list[dict]]:
        """(results, skipped) with one record per image, sorted by key, for the images in ``keys`` (all when
        None). A result supersedes skip records of the same image (a file fixed since); among results the
        first written wins; an image never evaluated keeps its latest skip record.

        The results are a :class:`StoredRecords` view: where each record lies is indexed in one streaming
        pass; the records themselves are read from the parts each time the view is iterated."""
        where: dict[str, tuple[Path, int, int]] = {}
        skipped: dict[str, dict] = {}
        for record, part, _, offset, length in self._scan():
            key = record["key"]
            if keys is not None and key not in keys:
                continue
            if "skipped" in record:
                skipped[key] = record
            elif key not in where:
                where[key] = (part, offset, length)
        return (StoredRecords([where[key] for key in sorted(where)]),
                [skipped[key] for key in sorted(skipped) if key not in where])


def record_index(out: Path, keys: Collection[str]) -> dict[str, tuple[Path, int, int]]:
    """Where each result of ``keys`` lies in the run folder ``out`` (part, offset, length; the first result
    written wins, as in :meth:`ResultStore.merged`), read without locking or changing the folder."""
    where: dict[str, tuple[Path, int, int]] = {}
    for part in sorted((Path(out) / "parts").glob("part-*.jsonl")):
        for number, offset, line in ResultStore._lines(part):
            try:
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError:
                raise StoreError(f"{display_path(str(part))}, line {number}: not a JSON record") from None
            if isinstance(record, dict) and record.get("key") in keys and "skipped" not in record:
                where.setdefault(record["key"], (part, offset, len(line)))
    return where


class StoredRecords:
    """Records of a store by position (part, offset, length), in a fixed order: ``len`` without reading them,
    each iteration streams them from disk (one record in memory at a time)."""

    def __init__(self, places: list[tuple[Path, int, int]]):
        self.places = places

    def __len__(self) -> int:
        return len(self.places)

    def __iter__(self) -> Iterator[dict]:
        handles: dict[Path, int] = {}
        try:
            for part, offset, length in self.places:
                if part not in handles:
                    handles[part] = os.open(part, os.O_RDONLY)
                yield json.loads(os.pread(handles[part], length, offset).decode("utf-8", "surrogateescape"))
        finally:
            for handle in handles.values():
                os.close(handle)
