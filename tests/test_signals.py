"""Processes and signals of a run with DataLoader workers: SIGTERM ends it like Ctrl-C (records kept, workers
gone, exit 143), Ctrl-C is prompt, and a second run on the same --out is refused while the first holds it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import insdel
from tests.conftest import EXAMPLES, REPO
from tests.test_eval_scripts import run

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to list a run's processes")


def many_images(root, copies=12):
    """A flat folder of the bundled photos, copied ``copies`` times (a run long enough to interrupt)."""
    root.mkdir()
    for n in range(copies):
        for photo in sorted(EXAMPLES.iterdir()):
            shutil.copy(photo, root / f"{n:02d}_{photo.name}")
    return root


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session: the script, its DataLoader workers and anything they started."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def spawn(argv, logs):
    """Start a script in a session of its own, its output in files (a pipe would stay open as long as an
    orphaned worker lives)."""
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=open(logs / "stdout", "w"),
                            stderr=open(logs / "stderr", "w"), start_new_session=True)


def start(out, data, logs):
    return spawn(["insdel.py", "gradcam", "-n", "2", "-a", "1.0", "-c", "180", "--device", "cpu", "--step",
                  str(224 * 112), "--batch-size", "1", "--workers", "2", "--target", "pred", "--img-path", str(data),
                  "--out", str(out)], logs)


def end_session(process):
    """Kill whatever is left of the script's session (after a failed check)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_for_records(process, part, count=1, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended early ({process.returncode})")
        if part.exists() and len(part.read_bytes().splitlines()) >= count:
            return
        time.sleep(0.05)
    pytest.fail("no record appeared")


def wait_gone(session, timeout=2.0):
    deadline = time.monotonic() + timeout
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.05)
    return session_processes(session)


def check_part(part):
    data = part.read_bytes()
    assert data.endswith(b"\n")  # no record cut short
    records = [json.loads(line) for line in data.splitlines()]
    assert records and all("rows" in r and "key" in r for r in records)
    return records


def test_sigterm_ends_the_run_like_ctrl_c_and_a_second_run_is_refused(tmp_path, capsys):
    data, out = many_images(tmp_path / "data"), tmp_path / "out"
    process = start(out, data, tmp_path)
    try:
        wait_for_records(process, out / "parts" / "part-0.jsonl")
        assert len(session_processes(process.pid)) >= 3  # the script and its two workers
        # a second run on the same folder while the first holds it
        code, _, err = run(insdel, ["gradcam", "-n", "2", "-a", "1.0", "-c", "180", "--device", "cpu", "--workers",
                                    "0", "--step", str(224 * 112), "--target", "pred", "--img-path", str(data),
                                    "--out", str(out)], capsys)
        assert code == 2 and "in use by another run" in err and str(out) in err and "Traceback" not in err
        process.send_signal(signal.SIGTERM)
        rc = process.wait(timeout=30)
        stderr = (tmp_path / "stderr").read_text()
        assert rc == 143, stderr
        assert "terminated" in stderr and "Traceback" not in stderr
        assert wait_gone(process.pid) == []  # no DataLoader worker outlives the script
    finally:
        end_session(process)
    records = check_part(out / "parts" / "part-0.jsonl")
    assert len({r["key"] for r in records}) == len(records)
    assert not (out / "summary.json").exists()


def test_ctrl_c_with_workers_is_prompt(tmp_path):
    data, out = many_images(tmp_path / "data"), tmp_path / "out"
    process = start(out, data, tmp_path)
    try:
        wait_for_records(process, out / "parts" / "part-0.jsonl")
        assert len(session_processes(process.pid)) >= 3
        began = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
        rc = process.wait(timeout=60)
        took = time.monotonic() - began
        stderr = (tmp_path / "stderr").read_text()
        assert rc == 130, stderr
        assert took < 3, f"Ctrl-C took {took:.1f} s"
        assert "Traceback" not in stderr
        assert wait_gone(process.pid) == []
    finally:
        end_session(process)
    check_part(out / "parts" / "part-0.jsonl")


def test_sigterm_to_visualization_leaves_no_worker(tmp_path):
    data, out = many_images(tmp_path / "data"), tmp_path / "out"
    process = spawn(["visualization.py", "gradcam", "--device", "cpu", "--batch-size", "1", "--workers", "2",
                     "--img-path", str(data), "--out", str(out)], tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(out.rglob("*.png"))):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended early"
            time.sleep(0.05)
        assert len(session_processes(process.pid)) >= 3
        process.send_signal(signal.SIGTERM)
        rc = process.wait(timeout=30)
        stderr = (tmp_path / "stderr").read_text()
        assert rc == 143, stderr
        assert "terminated" in stderr and "Traceback" not in stderr
        assert wait_gone(process.pid) == []
    finally:
        end_session(process)


# Runs a script with a hook that signals the script itself at its first fork (a DataLoader worker starting).
SIGNAL_AT_FORK = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
fired = []
def fire():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), {signum})
os.register_at_fork(before=fire)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script, signum, rc, word", [
    ("visualization.py", signal.SIGTERM, 143, "terminated"),
    ("visualization.py", signal.SIGINT, 130, "interrupted"),
    ("insdel.py", signal.SIGTERM, 143, "terminated"),
])
def test_a_signal_while_the_workers_fork_ends_the_run(script, signum, rc, word, tmp_path):
    data, out = many_images(tmp_path / "data", copies=1), tmp_path / "out"
    hook = tmp_path / "hook.py"
    hook.write_text(SIGNAL_AT_FORK.format(signum=int(signum)))
    flags = ["-n", "2", "-a", "1.0", "-c", "180", "--step", str(224 * 112)] if script == "insdel.py" else []
    process = spawn([str(hook), script, "gradcam", *flags, "--device", "cpu", "--batch-size", "1", "--workers", "2",
                     "--img-path", str(data), "--out", str(out)], tmp_path)
    try:
        code = process.wait(timeout=240)
        stderr = (tmp_path / "stderr").read_text()
        assert code == rc, stderr
        assert f"{script}: {word}" in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr
        assert wait_gone(process.pid) == []
    finally:
        end_session(process)
    assert not (out / "predictions.csv").exists() and not (out / "summary.json").exists()
