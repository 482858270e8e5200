"""Faults of a run's processes (issue 20): a killed script leaves no DataLoader worker and no held lock behind,
and its folder resumes at once."""
import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import insdel
import visualization
from app.lifecycle import run_cli
from common import render
from common.files import save_png
from common.images import load_rgb
from evaluation.errors import StoreError
from evaluation.store import ResultStore
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import run
from tests.test_signals import end_session, many_images, session_processes, start, wait_for_records, wait_gone

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to list a run's processes")


@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_killed_run_leaves_no_worker_and_its_folder_resumes(signum, tmp_path, capsys):
    data, out = many_images(tmp_path / "data", copies=2), tmp_path / "out"
    process = start(out, data, tmp_path)
    try:
        wait_for_records(process, out / "parts" / "part-0.jsonl")
        assert len(session_processes(process.pid)) >= 3  # the script and its two workers
        process.send_signal(signum)  # no handler runs: the script dies where it stands
        process.wait(timeout=30)
        assert wait_gone(process.pid, timeout=5) == []  # its workers died with it
    finally:
        end_session(process)
    kept = len((out / "parts" / "part-0.jsonl").read_bytes().splitlines())
    code, stdout, err = run(insdel, ["gradcam", "-n", "2", "-a", "1.0", "-c", "180", "--device", "cpu", "--workers",
                                     "0", "--step", str(224 * 112), "--target", "pred", "--img-path", str(data),
                                     "--out", str(out)], capsys)
    assert code == 0, err
    assert "in use by another run" not in err
    assert json.loads((out / "summary.json").read_text())["n_images"] == 8
    assert len((out / "parts" / "part-0.jsonl").read_bytes().splitlines()) == 8 > kept  # resumed, not redone


def test_lock_is_not_held_by_a_forked_child(tmp_path):
    store = ResultStore(tmp_path)
    store.lock()
    child = os.fork()
    if child == 0:  # a DataLoader worker is such a child: it must not keep the folder locked after its parent
        time.sleep(3)
        os._exit(0)
    try:
        store.release()  # the parent lets go (as when it dies) while the child still lives
        other = ResultStore(tmp_path)
        code = os.fork()
        if code == 0:  # another process: a lock held by the child would refuse it
            try:
                other.lock()
            except StoreError:
                os._exit(1)
            os._exit(0)
        assert os.waitpid(code, 0)[1] == 0
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")
    store = ResultStore(tmp_path)
    store.lock()
    assert f"was left by pid {dead.pid}, which ended without releasing it" in capsys.readouterr().out
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    store.release()
    assert (tmp_path / ".lock").read_text() == ""  # a normal end leaves no pid behind
    store.lock()
    assert "note" not in capsys.readouterr().out
    store.release()


def test_the_same_process_cannot_lock_a_folder_twice(tmp_path):
    first = ResultStore(tmp_path)
    first.lock()
    with pytest.raises(StoreError, match=f"in use by another run \\(pid {os.getpid()}, this process\\)"):
        ResultStore(tmp_path).lock()
    child = os.fork()  # the refused attempt closed no descriptor of the file: the first lock still holds
    if child == 0:
        try:
            ResultStore(tmp_path).lock()
        except StoreError:
            os._exit(1)
        os._exit(0)
    assert os.waitpid(child, 0)[1] >> 8 == 1
    first.release()


# ---- an image of an extreme aspect ratio: a panel of bounded size ---------------------------------------------

@pytest.mark.parametrize("height, width", [(1, 10000), (10000, 1), (2, 30000)])
def test_panel_of_an_extreme_image_is_letterboxed(height, width):
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    panel = render._titled(image, "a long title " * 20)
    assert panel.shape[0] == render.PANEL_HEIGHT + render.TITLE_HEIGHT
    assert render.PANEL_HEIGHT // render.MAX_ASPECT <= panel.shape[1] <= render.PANEL_HEIGHT * render.MAX_ASPECT


def test_panel_of_an_ordinary_image_keeps_its_aspect():
    image = np.zeros((200, 500, 3), np.uint8)
    panel = render._titled(image, "input")
    assert panel.shape == (render.PANEL_HEIGHT + render.TITLE_HEIGHT, 750, 3)
    assert (panel[render.TITLE_HEIGHT:] == 0).all()  # no letterbox band


def test_visualization_writes_every_image_of_a_folder_with_a_10000_by_1_image(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLES / "chelsea.jpg", data / "chelsea.jpg")
    save_png(data / "strip.png", np.random.default_rng(0).integers(0, 256, (1, 10000, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as stop:
        run_cli(visualization.main, ["gradcam", "--device", "cpu", "--workers", "0", "--img-path", str(data),
                                     "--out", str(tmp_path / "out")], prog=visualization.PROG)
    err = capsys.readouterr().err
    assert stop.value.code == 0, err
    with open(tmp_path / "out" / "predictions.csv") as handle:
        assert sorted(Path(row["file"]).name for row in csv.DictReader(handle)) == ["chelsea.jpg", "strip.png"]
    figure = load_rgb(tmp_path / "out" / "strip_gradcam.png")
    assert figure.shape[1] <= 3 * render.PANEL_HEIGHT * render.MAX_ASPECT + 12
