"""The store streamed: status() and merged() keep keys and positions, not records; records that cannot belong to
the run are refused with their file and line; the progress text keeps running sums."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.errors import StoreError
from evaluation.store import ResultStore, StoredRecords
from evaluation.task import RunningMeans


def record(key: str, **rows) -> dict:
    return {"key": key, "file": f"{key}.jpg", "target": 1, "rows": rows}


def test_merged_is_a_sorted_reiterable_view_with_the_first_result_winning(tmp_path):
    store = ResultStore(tmp_path)
    store.append([record("b", gradcam={"insertion": 1.0}), {"key": "c", "skipped": "broken"}])
    store.append([record("a", gradcam={"insertion": 2.0}), record("b", gradcam={"insertion": 9.0}),
                  record("c", gradcam={"insertion": 3.0}), {"key": "d", "skipped": "old"},
                  {"key": "d", "skipped": "new"}])
    results, skipped = store.merged()
    assert isinstance(results, StoredRecords) and len(results) == 3
    first = [(r["key"], r["rows"]["gradcam"]["insertion"]) for r in results]
    assert first == [("a", 2.0), ("b", 1.0), ("c", 3.0)]
    assert [(r["key"], r["rows"]["gradcam"]["insertion"]) for r in results] == first  # iterated again
    assert skipped == [{"key": "d", "skipped": "new"}]
    results, _ = store.merged({"a", "d"})
    assert [r["key"] for r in results] == ["a"]
    assert store.status() == ({"a", "b", "c"}, {"d"})


def test_a_torn_last_line_is_left_out_of_status_and_merge(tmp_path):
    store = ResultStore(tmp_path)
    store.append([record("a", gradcam={"insertion": 2.0})])
    with open(store.path, "ab") as handle:
        handle.write(b'{"key": "b", "rows"')
    assert store.status() == ({"a"}, set())
    assert [r["key"] for r in store.merged()[0]] == ["a"]


def test_a_damaged_middle_line_names_its_file_and_line(tmp_path):
    store = ResultStore(tmp_path)
    store.append([record("a", gradcam={"insertion": 2.0})])
    with open(store.path, "ab") as handle:
        handle.write(b"not json\n")
    store.append([record("b", gradcam={"insertion": 2.0})])
    with pytest.raises(StoreError, match=r"part-0.jsonl:2: not a JSON record"):
        store.status()


def test_streamed_status_refuses_records_of_another_method_at_their_line(tmp_path):
    """The streaming status() applies check_record (tests/test_resume.py) to every line: a layercam folder
    holding gradcam records is refused at the first such line, before any work."""
    store = ResultStore(tmp_path)
    store.append([record("a", layercam={"insertion": 1.0, "deletion": 2.0}),
                  record("b", gradcam={"insertion": 1.0, "deletion": 2.0})])
    store.expect(rows=["layercam"], fields=("deletion", "insertion"), keys=("file", "target"))
    with pytest.raises(StoreError, match=r"part-0.jsonl:2: a record without this run's row\(s\) layercam"):
        store.status()


def test_running_means_equal_the_means_of_every_record_so_far():
    rng = np.random.default_rng(0)
    running = RunningMeans(("deletion", "insertion"), digits=3)
    seen = []
    for _ in range(5):
        batch = [record(str(i), gradcam={"deletion": float(v), "insertion": float(w)},
                        **{"gradcam*": {"deletion": math.nan if v > 0.8 else float(v), "insertion": float(w)}})
                 for i, (v, w) in enumerate(rng.random((4, 2)))]
        running.add(batch)
        seen += batch
        expected = ", ".join(name + " " + "/".join(f"{np.nanmean([r['rows'][name][f] for r in seen]):.3f}"
                                                   for f in ("deletion", "insertion"))
                             for name in ("gradcam", "gradcam*"))
        assert running.text() == expected
    hits = RunningMeans(("hit",), scale=100, unit="%")
    hits.add([record("a", center={"hit": [True, False]}), record("b", center={"hit": [True]})])
    assert hits.text() == "center 66.7%"
    assert RunningMeans(("ap",)).text() == ""


def test_merged_records_are_read_lazily(tmp_path):
    """The view holds positions only: a record's content is read when iterated (it is not in memory before)."""
    store = ResultStore(tmp_path)
    store.append([record(f"k{i:03d}", gradcam={"insertion": float(i), "curve": [0.5] * 100}) for i in range(50)])
    results, _ = store.merged()
    assert all(len(place) == 3 for place in results.places)
    assert sum(1 for _ in results) == 50
    line = json.loads(store.path.read_text().splitlines()[7])
    assert list(results)[7] == line
