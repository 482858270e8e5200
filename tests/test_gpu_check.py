"""GPU readiness checked on a CPU: where torchrun's ranks land on too few GPUs."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from evaluation import distributed
from evaluation.distributed import LaunchError, gpu_placement


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
