"""What every benchmark shares: the run flags, the timer, the CPU-time split, the model as the scripts run it.

Each benchmark prints, per model, its wall times and the process's user and system CPU seconds spent on
that model: system time is where glibc's page faults show (``common.allocator``); run a benchmark with
``UCAG_SYSTEM_MALLOC=1`` to measure the default allocator.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.flags import MEMORY_FORMATS  # noqa: E402
from app.setup import resolve_device  # noqa: E402
from common.allocator import keep_freed_memory  # noqa: E402
from common.precision import PRECISIONS, Precision  # noqa: E402
from models import ModelSpec, load_model  # noqa: E402


def add_run_flags(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--memory-format", choices=MEMORY_FORMATS, default=None,
                        help="default: the scripts' (channels_last; contiguous for the relevance methods)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"best of N timed runs (default {repeats})")


@dataclass
class Run:
    """The device and precision of a benchmark run, set up as the scripts do."""

    device: torch.device
    precision: Precision
    memory_format: torch.memory_format

    def model(self, name: str, weights: str | None = None) -> ModelSpec:
        """The model by name in the run's memory format; the embedded model with its weights, others random."""
        torch.manual_seed(0)
        weights = weights or ("default" if name == "efficientnet_lite0" else "random")
        spec = load_model(name, weights, self.device)
        spec.model.to(memory_format=self.memory_format)
        return spec


def start(args: argparse.Namespace, what: str, memory_format: str = "channels_last") -> Run:
    """Allocator, device and precision as the scripts set them; prints the run's header. ``memory_format``:
    the layout when --memory-format is not given (the one the scripts choose for the benchmarked methods)."""
    args.memory_format = args.memory_format or memory_format
    allocator = keep_freed_memory()
    device = resolve_device(args.device)
    precision = Precision(args.precision, device)
    precision.apply()
    warnings.simplefilter("ignore")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"allocator: {allocator} (UCAG_SYSTEM_MALLOC=1 measures the default); torch {torch.__version__}, "
          f"{hardware}, {args.precision}, {args.memory_format}; {what}; best of {args.repeats}")
    return Run(device, precision, MEMORY_FORMATS[args.memory_format])


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` runs after one warm-up (seconds)."""
    return timed_together({"fn": fn}, device, repeats)["fn"]


def timed_together(fns: dict, device: torch.device, repeats: int) -> dict:
    """{name: best wall time (seconds)} of ``repeats`` rounds that run every function once, in turn, after
    one warm-up round: a ratio of two of them then compares runs made minutes apart at most, not at two
    ends of a benchmark, on a machine whose speed drifts."""
    best = {name: float("inf") for name in fns}
    for round_index in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                best[name] = min(best[name], time.perf_counter() - begin)
    return best


def forward_backward_once(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward of the top logit: the unit the methods are compared with."""
    leaf = x.clone().requires_grad_(True)
    model(leaf).max(dim=1).values.sum().backward()
    model.zero_grad(set_to_none=True)


class CpuTime:
    """User and system CPU seconds of this process since the last :meth:`split`."""

    def __init__(self):
        self.last = resource.getrusage(resource.RUSAGE_SELF)

    def split(self) -> str:
        now = resource.getrusage(resource.RUSAGE_SELF)
        user, system = now.ru_utime - self.last.ru_utime, now.ru_stime - self.last.ru_stime
        self.last = now
        return f"CPU user {user:.1f} s, sys {system:.1f} s"
