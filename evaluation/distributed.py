"""torch.distributed for runs under ``torchrun``: one process per device, disjoint shards, rank 0 merges."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from common.errors import ToolkitError

T = TypeVar("T")


class LaunchError(ToolkitError):
    """torchrun's environment variables set only in part (a leftover WORLD_SIZE, a missing MASTER_ADDR)."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # whether init() created the process group (finish() ends it) or found it joined already (by reproduce.py,
    # which runs several scripts in one process: the group outlives each of them)
    owns_group: bool = field(default=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's disjoint share of ``items`` (round-robin keeps shards balanced)."""
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def on_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0 only, its result on every rank (a listing done once, not once per rank). A
        toolkit error on rank 0 (a bad labels file) is raised on every rank, so none waits for the others."""
        if self.world <= 1:
            return compute()
        result, problem = None, None
        if self.is_main:
            try:
                result = compute()
            except ToolkitError as exc:
                problem = (type(exc), str(exc))
        result, problem = self.from_main((result, problem))
        if problem is not None:
            raise problem[0](problem[1])
        return result

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (e.g. rank 0's verdict on the output folder)."""
        if self.world <= 1:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]


def init(device_request: str | None) -> tuple[Dist, str | None]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA; gloo when the node's
    processes outnumber its GPUs, see :func:`gpu_placement`).

    Returns the rank info and the device to use (``cuda:LOCAL_RANK % GPUs`` under torchrun with GPUs).
    """
    world = _number("WORLD_SIZE", "1")
    if world <= 1:
        return Dist(), device_request
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "not: start several processes with torchrun, or unset WORLD_SIZE (a leftover of another "
                          "launcher) for one process")
    rank, local_rank = _number("RANK", "0"), _number("LOCAL_RANK", "0")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    wants_cuda = (device_request or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "gloo"
    if wants_cuda and torch.cuda.is_available():
        local_world = _number("LOCAL_WORLD_SIZE", str(world))
        index, backend = gpu_placement(local_rank, local_world, torch.cuda.device_count())
        if backend == "gloo" and rank == 0:
            print(f"note: {local_world} processes share {torch.cuda.device_count()} GPU(s) (NCCL takes one process "
                  "per GPU): ranks exchange their few messages through gloo", file=sys.stderr)
        torch.cuda.set_device(index)
        device_request = f"cuda:{index}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return Dist(rank, world, local_rank, owns), device_request


def gpu_placement(local_rank: int, local_world: int, device_count: int) -> tuple[int, str]:
    """(GPU index, process-group backend) of a rank: ranks beyond the GPU count wrap round (cuda:local_rank %
    count). NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so a node with more processes than
    GPUs uses gloo on every rank; the ranks only exchange a barrier and a few small objects, so it costs
    nothing. The decision depends on the node's process and GPU counts only, so every rank takes the same."""
    if device_count < 1:
        raise LaunchError("torchrun asked for CUDA but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    return local_rank % device_count, "nccl" if local_world <= device_count else "gloo"


def _number(name: str, default: str) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"the environment variable {name}={text!r} is not a whole number") from None


def finish(info: Dist) -> None:
    """Wait for every rank; end the process group where :func:`init` created it."""
    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        if info.owns_group:
            dist.destroy_process_group()
