"""What a metric contributes to the evaluation driver (:func:`evaluation.driver.run_task`): a :class:`Task`
with named methods, and the progress bar's running figures (:class:`RunningText`)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any


class RunningText:
    """The progress bar's running figures: :meth:`add` takes each batch's new records once, :meth:`text`
    reads sums kept so far, so the cost per batch does not grow with the records of the run. This base
    shows nothing."""

    def add(self, records: Iterable[dict]) -> None:
        """Take in a batch's new records (this base keeps nothing)."""

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


class Task(ABC):
    """A metric, as :func:`evaluation.driver.run_task` runs it.

    ``items``: everything to evaluate; :meth:`key`: an item's unique, stable id (the resume key);
    :meth:`load`: the decoded item (in DataLoader workers); :meth:`process`: a decoded batch -> one record
    per item; :meth:`summarize` and :meth:`write`: summary.json and the report files from every record of
    the run; :meth:`running`: the progress bar's figures; ``description``: the bar's label; :meth:`shape`:
    what a stored record must hold to belong to this run.
    """

    description: str = "evaluating"

    @property
    @abstractmethod
    def items(self) -> Sequence[Any]:
        """Everything to evaluate, in order."""

    @abstractmethod
    def key(self, item: Any) -> str:
        """The item's unique, stable id (the resume key)."""

    @abstractmethod
    def load(self, item: Any) -> dict:
        """The decoded item as a dict with 'key' ('error' when it cannot be read; runs in workers)."""

    @abstractmethod
    def process(self, batch: list[dict]) -> list[dict]:
        """The decoded batch -> one JSON-able record per item, each with 'key'."""

    @abstractmethod
    def summarize(self, records: Collection[dict]) -> dict:
        """Every record of the run -> the summary (summary.json). ``records`` is a sized, re-iterable view
        streamed from the store (:class:`evaluation.store.StoredRecords`): iterate it, in as few passes as
        possible, rather than index it."""

    @abstractmethod
    def write(self, out: Path, records: Collection[dict], skipped: list[dict], summary: dict) -> None:
        """The report files in ``out`` (``records``: the same view as :meth:`summarize`'s)."""

    def running(self) -> RunningText:
        """A fresh progress-bar text for one run, fed each batch's new records once (this base: none)."""
        return RunningText()

    def shape(self) -> dict:
        """What a stored result must hold to belong to this run (rows, fields, lists, keys, unscored), see
        :func:`evaluation.store.check_record`: a folder holding other records is refused with file and line."""
        return {}
