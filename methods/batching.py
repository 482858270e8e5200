"""Batch sizes from the memory a device has free: crops per UCAG chunk, masked images per forward.

A batch's memory is about its size times what one input needs, and that is measured, not guessed:
:func:`activation_bytes` runs one no-grad forward of a single input of the given size and records the
bytes of every module's output. With gradients an input holds about all of them (the tensors a backward
keeps) plus twice the largest (its gradient in flight); without, about three times the largest (a
layer's input, output and a residual). :func:`batch_for_memory` divides a share of the free memory by
that and keeps the result between 1 and a ceiling: 8 on a CPU, where larger chunks measured no faster
(efficientnet_lite0 at 322 px: 12.3 ms per crop in chunks of 8, 14.1 in 16 to 48, 19.5 in 72; resnet50
45.5-49.0 ms for every chunk from 8 to 72), 1024 on a GPU, which stops gaining in the hundreds.
:func:`even_chunks` then spreads a known number of inputs over equal chunks. :func:`run_chunks` runs a chunked
loop that survives an out-of-memory error: the chunk is halved and retried, and the size that fit is kept.
"""
from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Hashable
from functools import partial

import torch
from torch import nn

from common.precision import full_precision
from methods.hooks import restored_state
from methods.options import Option, positive_int

MEMORY_SHARE = 0.5  # of the free memory a batch may fill (the rest: the model, the caches, other batches)
CEILING = {"cpu": 8, "cuda": 1024}

# the methods that score masked copies of the input (Score-CAM, RISE, SISE, Ada-SISE); None: from free memory
MASK_BATCH = Option("mask_batch", "--mask-batch", None, partial(positive_int, optional=True),
                    "masked images scored per forward", type=int, shown="from free memory, as --patch-batch")

_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(size, device): bytes}
_fitted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: chunk that fit after an OOM}


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors: on CUDA the driver's free memory plus PyTorch's cached, unused blocks; on a
    CPU the kernel's MemAvailable (whole pages the process can get without swapping)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such sysconf (macOS, Windows): assume 4 GiB
        return 4 * 2 ** 30


def activation_bytes(model: nn.Module, size: tuple[int, int], device: torch.device) -> tuple[int, int]:
    """(sum, largest) bytes of the module outputs of one no-grad forward of a single (1, 3, *size) input on
    ``device`` (the model's own state is restored; the input is zeros). Measured once per model, size and
    device."""
    known = _measured.setdefault(model, {})
    key = (tuple(size), str(device))
    if key not in known:
        known[key] = _measure(model, size, device)
    return known[key]


def _measure(model: nn.Module, size: tuple[int, int], device: torch.device) -> tuple[int, int]:
    sizes = [0]

    def count(module, inputs, output):
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                sizes.append(tensor.numel() * tensor.element_size())

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_hook(count) for module in leaves]
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    try:  # in float32 also inside a bf16 autocast region: the larger, safe estimate
        with restored_state(model), torch.no_grad(), full_precision(device.type):
            model(torch.zeros(1, 3, *size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return max(sum(sizes), 1), max(max(sizes), 1)


def batch_for_memory(model: nn.Module, size: tuple[int, int], device: torch.device, gradients: bool,
                     ceiling: int | None = None) -> int:
    """Inputs of ``size`` per forward (with ``gradients``: per forward+backward) that fit in
    MEMORY_SHARE of the device's free memory, between 1 and ``ceiling`` (default CEILING[device.type])."""
    total, largest = activation_bytes(model, size, device)
    per_input = total + 2 * largest if gradients else 3 * largest
    limit = ceiling if ceiling is not None else CEILING.get(device.type, 64)
    return max(1, min(limit, int(free_memory(device) * MEMORY_SHARE // per_input)))


def even_chunks(count: int, limit: int) -> int:
    """The chunk size that covers ``count`` inputs in as few chunks of at most ``limit`` as possible, all
    of about the same size (36 crops under a limit of 31: two chunks of 18, not 31 + 5)."""
    if count <= 0:
        return max(limit, 1)
    return math.ceil(count / math.ceil(count / limit))


def run_chunks(total: int, size: int, step: Callable[[int, int], None], model: nn.Module, key: Hashable,
               what: str = "inputs", progress: Callable[[int], None] | None = None) -> None:
    """``step(start, stop)`` for consecutive chunks of at most ``size`` of ``range(total)``. ``step`` must leave
    nothing behind when it raises (results written, or added after its forward), so a chunk can run again.
    On ``torch.OutOfMemoryError`` the chunk is halved, the CUDA cache emptied and the chunk retried; a chunk of
    one that does not fit re-raises. The size that fit is kept for ``model`` and ``key`` (the work, input size
    and device), so later loops start there; one warning per loop names both sizes. ``progress(n)`` is told
    each chunk's length once it is done."""
    fitted = _fitted.setdefault(model, {})
    size = max(1, min(size, fitted.get(key, size)))
    first_size, start = size, 0
    while start < total:
        stop = min(start + size, total)
        try:
            step(start, stop)
        except torch.OutOfMemoryError:
            if stop - start == 1:
                raise
        else:
            if progress is not None:
                progress(stop - start)
            start = stop
            continue
        # outside the except block: the exception and the tensors its frames held are released
        size = fitted[key] = (stop - start) // 2
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    if size < first_size:
        warnings.warn(f"out of memory in chunks of {first_size} {what}: continued in chunks of {size}",
                      RuntimeWarning, stacklevel=2)
