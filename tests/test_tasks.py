"""Evaluation tasks as classes with named methods (evaluation.task.Task and its metrics), the rows' shared
explain loop (x's logits once, explicit targets for every row) and their one final-map rule."""
import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import visualization
from evaluation.distributed import Dist
from evaluation.driver import run_task
from evaluation.errors import EvaluationError
from evaluation.pointing_task import PointingGameTask
from evaluation.rows import Row, batch_targets, explain_rows
from evaluation.segmentation_task import SegmentationTask
from evaluation.store import ResultStore
from evaluation.task import RunningText, Task
from methods import build_explainer
from ucag import UCAG

REPO = Path(__file__).resolve().parents[1]


class Counting(Task):
    """Three items, each scored 1; counts the calls of its named methods."""

    description = "counting"

    def __init__(self):
        self.calls = {"running": 0, "write": 0}

    @property
    def items(self):
        return ["a", "b", "c"]

    def key(self, item):
        return f"k-{item}"

    def load(self, item):
        return {"key": self.key(item)}

    def process(self, batch):
        return [{"key": r["key"], "rows": {"r": {"score": 1}}} for r in batch]

    def summarize(self, records):
        return {"n": len(records), "total": sum(r["rows"]["r"]["score"] for r in records)}

    def write(self, out, records, skipped, summary):
        self.calls["write"] += 1
        (out / "summary.txt").write_text(str(summary))

    def running(self):
        self.calls["running"] += 1
        return RunningText()

    def shape(self):
        return {"rows": ["r"], "fields": ("score",)}


def test_a_task_without_one_of_its_named_methods_cannot_be_built():
    class NoWrite(Counting):
        write = Task.write

    with pytest.raises(TypeError, match="write"):
        NoWrite()


def test_run_task_calls_the_tasks_named_methods(tmp_path):
    task = Counting()
    summary = run_task(task, ResultStore(tmp_path), Dist(), batch_size=2, workers=0)
    assert summary == {"n": 3, "total": 3}
    assert task.calls == {"running": 1, "write": 1}
    assert (tmp_path / "summary.txt").read_text() == str(summary)
    assert run_task(task, ResultStore(tmp_path), Dist(), batch_size=2, workers=0) == summary  # resumed: all done


def full_size_forwards(model: torch.nn.Module, side: int) -> tuple[list, object]:
    calls = []
    handle = model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[-1] == side))
    return calls, handle


def test_explain_rows_compute_xs_logits_once_and_give_every_row_the_targets(lite, photo_batch):
    x = photo_batch[:2]
    rows = [Row("gradcam", build_explainer("gradcam", lite)),
            Row("gradcam*", UCAG(build_explainer("gradcam", lite), n=2, alpha=1.0), ucag=True)]
    rows[0].explainer.num_classes(x)  # K for the range check of given targets: one forward, once per explainer
    calls, handle = full_size_forwards(lite.model, x.shape[-1])
    try:
        targets, logits = batch_targets(lite.model, x, None)  # the prediction: one no-grad forward
        explained = list(explain_rows(rows, x, targets, logits))
    finally:
        handle.remove()
    assert sum(calls) == 2  # batch_targets' forward and the base row's own; the UCAG row reuses the logits
    assert torch.equal(targets, lite.model(x).argmax(dim=1))
    assert all(explanation.logits.shape == logits.shape for _, explanation, _ in explained)
    torch.testing.assert_close(explained[1][1].maps, rows[1].explainer(x, targets).maps, rtol=0, atol=0)
    given = torch.tensor([1, 2])
    kept, no_logits = batch_targets(lite.model, x, given)
    assert kept is given and no_logits is None  # given classes: no forward


def test_explain_rows_fold_ucag_crops_once_both_ways(lite, photo_batch):
    x = photo_batch[:1]
    ucag = UCAG(build_explainer("gradcam", lite), n=2, alpha=1.0)
    targets, logits = batch_targets(lite.model, x, None)
    (_, own, gaussian), = explain_rows([Row("gradcam*", ucag, ucag=True)], x, targets, logits, also="gaussian")
    folded = ucag.explain_blends(x, targets, ("constant", "gaussian"), logits=logits)
    assert torch.equal(own.maps, folded["constant"].maps) and torch.equal(gaussian.maps, folded["gaussian"].maps)
    assert not torch.equal(own.maps, gaussian.maps)
    (_, same, again), = explain_rows([Row("gradcam*", ucag, ucag=True)], x, targets, logits, also="constant")
    assert same is again


def test_a_rows_final_maps_keep_the_sign_of_signed_explainers_only(resnet_random):
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    for name in ("lrp", "gradcam"):
        row = Row(name, build_explainer(name, resnet_random))
        raw = row.explain(x, torch.tensor([0])).maps
        final = row.final(raw, (20, 30))
        expected = (row.explainer.finalize_signed if row.explainer.signed else row.explainer.finalize)(raw, (20, 30))
        assert torch.equal(final, expected) and final.shape == (1, 1, 20, 30)
        assert (float(final.min()) < 0) == (name == "lrp")


class Spy:
    """An explainer stand-in recording the targets it is given."""

    signed = False

    def __init__(self, explainer):
        self.explainer, self.seen = explainer, []

    def __call__(self, x, targets):
        self.seen.append(targets)
        return self.explainer(x, targets)


def test_visualization_gives_every_row_explicit_targets(lite, photos):
    spy = Spy(build_explainer("gradcam", lite))
    ucag = UCAG(build_explainer("gradcam", lite), n=2, alpha=1.0)
    seen = []
    original = ucag.explain_blends
    ucag.explain_blends = lambda x, targets, blends, logits=None: seen.append((targets, logits)) or original(
        x, targets, blends, logits=logits)
    rows = [Row("gradcam", spy), Row("gradcam*", ucag, ucag=True)]
    setup = SimpleNamespace(spec=lite, device=torch.device("cpu"), rows=lambda: rows)
    records = [SimpleNamespace(input=photo) for photo in photos[:2]]
    maps, targets, probabilities = visualization.explain_batch(setup, records, None, "gaussian")
    assert spy.seen[0] is not None and torch.equal(spy.seen[0], targets)
    assert len(seen) == 1 and torch.equal(seen[0][0], targets) and seen[0][1] is not None
    assert [row.name for row, _, _ in maps] == ["gradcam", "gradcam*"] and maps[1][1] is not maps[1][2]
    assert probabilities.shape == (2,) and bool((probabilities > 0).all())


def pointing_task(flags):
    dataset = SimpleNamespace(categories=["cat", "dog"])
    rows = [Row("m", None), Row("m*", None, ucag=True)]
    return PointingGameTask(dataset, [], rows, None, torch.device("cpu"), {"dataset": "voc07", "model": "vgg16",
                            "method": "m"}, 15, "torchray", "difficult", flags)


def test_pointing_task_summarizes_and_writes_per_class(tmp_path):
    scores = {"hit": [True, False], "energy": [0.5, 0.25]}
    pairs = [{"class": 0, "difficult": False}, {"class": 1, "difficult": True}]
    records = [{"key": "1", "file": "1.jpg", "pairs": pairs,
                "rows": {"m": scores, "m*": {"hit": [True, True], "energy": [1.0, 0.0]}}},
               {"key": "2", "file": "2.jpg", "pairs": [], "rows": {}}]
    task = pointing_task({"1": [False, True]})
    summary = task.summarize(records)
    assert list(summary) == ["dataset", "model", "method", "n_images", "n_pairs", "tolerance", "aggregation", "rows"]
    assert summary["n_images"] == 2 and summary["n_pairs"] == 2
    assert summary["rows"][0] == {"name": "m", "ucag": False, "pointing_all": 50.0, "pointing_difficult": 0.0,
                                  "energy_all": 37.5, "energy_difficult": 25.0}
    assert summary["rows"][1]["pointing_all"] == 100.0 and summary["rows"][1]["pointing_difficult"] == 50.0
    assert np.isnan(pointing_task(None).summarize(records)["rows"][0]["pointing_difficult"])
    task.write_per_class(tmp_path / "per_class.csv", records)
    lines = (tmp_path / "per_class.csv").read_text().splitlines()
    assert lines[1] == "0,cat,1,0,100.00,,50.00,,100.00,,100.00,"
    assert lines[2] == "1,dog,1,1,0.00,0.00,25.00,25.00,100.00,100.00,0.00,0.00"
    with pytest.raises(EvaluationError, match="has a class to point at"):
        task.summarize(records[1:])


def test_segmentation_task_summarizes_pixel_accuracy_and_map():
    rows = [Row("m", None), Row("m*", None, ucag=True)]
    task = SegmentationTask(None, ["00000", "00001"], rows, None, torch.device("cpu"), {"model": "vgg19",
                            "method": "m"}, "agf")
    records = [{"key": "00000", "rows": {"m": {"correct": 3, "labelled": 4, "ap": 0.5},
                                         "m*": {"correct": 4, "labelled": 4, "ap": float("nan")}}},
               {"key": "00001", "rows": {"m": {"correct": 1, "labelled": 4, "ap": 0.25},
                                         "m*": {"correct": 0, "labelled": 0, "ap": float("nan")}}}]
    summary = task.summarize(records)
    assert list(summary) == ["model", "method", "n_images", "ap", "rows"] and summary["ap"] == "agf"
    assert summary["rows"][0] == {"name": "m", "ucag": False, "pixel_accuracy": 0.5, "map": 0.375}
    assert summary["rows"][1]["pixel_accuracy"] == 1.0 and np.isnan(summary["rows"][1]["map"])
    assert task.items == ["00000", "00001"] and task.key("00001") == "00001"


@pytest.mark.parametrize("script", ["pointing_game.py", "segmentation.py", "insdel.py", "density.py", "confidence.py",
                                    "road.py", "sanity.py"])
def test_metric_scripts_are_a_parser_and_one_call(script):
    text = (REPO / script).read_text(encoding="utf-8")
    assert len(text.splitlines()) < 80, f"{script}: {len(text.splitlines())} lines"
    main = next(node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert not [node for node in ast.walk(main) if isinstance(node, (ast.For, ast.While, ast.FunctionDef, ast.Lambda))
                and node is not main]
    calls = [node.func.id for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    assert sum(name.startswith("run_") for name in calls) == 1, calls
