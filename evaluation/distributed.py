"""torch.distributed for runs under ``torchrun``: one process per device, disjoint shards, rank 0 merges."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's disjoint share of ``items`` (round-robin keeps shards balanced)."""
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init(device_request: str | None) -> tuple[Dist, str | None]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA).

    Returns the rank info and the device to use (``cuda:LOCAL_RANK`` under torchrun with GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device_request
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = (device_request or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if wants_cuda and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device_request = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda and torch.cuda.is_available() else "gloo")
    return Dist(rank, world, local_rank), device_request


def finish(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
