"""--base-from (evaluation/reuse.py): a run takes the base row from another run of the same base-row settings
(a sweep of UCAG's settings computes the method's own row once), never from a run of other settings."""
import json

import pytest

import confidence
import evaluation.rows
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import FAST, run

BASE = ["gradcam", *FAST, "--img-path", str(EXAMPLES), "--batch-size", "2"]


@pytest.fixture
def explained(monkeypatch):
    """Names of the rows explained, one entry per batch and row."""
    calls = []
    original = evaluation.rows.Row.explain_folds

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(evaluation.rows.Row, "explain_folds", counted)
    return calls


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def with_alpha(argv, alpha):
    argv = list(argv)
    argv[argv.index("-a") + 1] = alpha
    return argv


def test_the_base_row_is_taken_not_computed(tmp_path, capsys, explained):
    first, second, alone = tmp_path / "a1", tmp_path / "a15", tmp_path / "alone"
    assert run(confidence, [*BASE, "--out", str(first)], capsys)[0] == 0
    assert explained.count("gradcam") == 2  # two batches of two photos
    explained.clear()
    code, out, err = run(confidence, [*with_alpha(BASE, "1.5"), "--out", str(second), "--base-from", str(first)],
                         capsys)
    assert code == 0, err
    assert explained == ["gradcam*", "gradcam*"] and "2 batch(es) took the gradcam row" in out
    assert run(confidence, [*with_alpha(BASE, "1.5"), "--out", str(alone)], capsys)[0] == 0
    reused, computed = summary(second), summary(alone)
    assert reused["rows"] == computed["rows"]  # the same numbers as a run that computed both rows
    assert reused["rows"][0] == summary(first)["rows"][0]
    assert (second / "per_image.csv").read_text() == (alone / "per_image.csv").read_text()
    recorded = json.loads((second / "run.json").read_text())
    assert recorded["about"]["base_from"] == str(first.resolve()) and "base_from" not in recorded


def test_a_partial_run_is_used_where_it_has_the_batch(tmp_path, capsys, explained):
    first, second = tmp_path / "partial", tmp_path / "b"
    assert run(confidence, [*BASE, "--out", str(first), "--limit", "2"], capsys)[0] == 0
    explained.clear()
    code, out, err = run(confidence, [*with_alpha(BASE, "1.5"), "--out", str(second), "--base-from", str(first)],
                         capsys)
    assert code == 0, err
    assert explained.count("gradcam") == 1 and "1 batch(es) took" in out
    assert summary(second)["n_images"] == 4


@pytest.mark.parametrize("change, message", [
    (lambda argv: ["layercam", *argv[1:]], "method: 'gradcam' -> 'layercam'"),
    (lambda argv: [*argv, "--deterministic"], "deterministic: False -> True"),
])
def test_other_base_settings_are_refused(tmp_path, capsys, change, message):
    first = tmp_path / "a"
    assert run(confidence, [*BASE, "--out", str(first), "--limit", "2"], capsys)[0] == 0
    code, _, err = run(confidence, [*change(BASE), "--out", str(tmp_path / "b"), "--base-from", str(first)], capsys)
    assert code != 0 and "--base-from" in err and message in err and "Traceback" not in err


def test_bad_folders(tmp_path, capsys):
    out = tmp_path / "b"
    code, _, err = run(confidence, [*BASE, "--out", str(out), "--base-from", str(tmp_path / "nowhere")], capsys)
    assert code != 0 and "no run.json there" in err
    code, _, err = run(confidence, [*BASE, "--out", str(out), "--base-from", str(out)], capsys)
    assert code != 0 and "is this run's own --out" in err
