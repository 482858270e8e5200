"""Reading image files in background workers; unreadable files become records with an error."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import ImageError
from common.images import load_rgb


@dataclass
class ImageRecord:
    """One file: its decoded RGB pixels, or why it could not be read."""

    index: int
    path: Path
    image: np.ndarray | None = None
    error: str | None = None
    pixels: torch.Tensor | None = None  # the same pixels as a tensor, for a pinning DataLoader (GPU runs)

    @property
    def input(self) -> np.ndarray | torch.Tensor:
        """What goes to the model's preprocessing: the (pinned) tensor when there is one."""
        return self.pixels if self.pixels is not None else self.image

    def pin_memory(self) -> ImageRecord:
        """Called by a DataLoader with ``pin_memory=True`` (in its pinning thread)."""
        return replace(self, pixels=self.pixels.pin_memory()) if self.pixels is not None else self


class ImageFiles(Dataset):
    """Decodes image files to uint8 RGB; never raises for a bad file."""

    def __init__(self, paths: Sequence[Path], tensors: bool = False):
        self.paths, self.tensors = list(paths), tensors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageRecord:
        path = self.paths[index]
        try:
            image = load_rgb(path)
            return ImageRecord(index, path, image=image, pixels=torch.from_numpy(image) if self.tensors else None)
        except ImageError as exc:
            return ImageRecord(index, path, error=str(exc))


def _as_list(records: list[ImageRecord]) -> list[ImageRecord]:
    return records


# The pid of the process that forked this one (recorded in the parent just before every fork).
_forked_by: int | None = None


def _note_forker() -> None:
    global _forked_by
    _forked_by = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_note_forker)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the thread that forked it) ends, however it
    ends (SIGKILL, SIGHUP, a crash): an orphaned worker would keep decoding forever. Linux only; elsewhere
    torch's own watch (the worker checks its parent every 5 s while idle) is all there is."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if _forked_by is not None and os.getppid() != _forked_by:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def ignore_interrupts(worker_id: int) -> None:
    """Worker start: die with the parent; ignore Ctrl-C (the terminal sends SIGINT to the whole process group,
    and the main process alone stops the run and shuts its workers down, promptly, instead of waiting for dead
    ones); SIGTERM ends the worker at once."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the handlers inherited from the parent (start_batches')


def _shut_down(batches) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def start_batches(loader: DataLoader):
    """``iter(loader)``, which forks the workers, with SIGINT and SIGTERM held back meanwhile: Python runs a
    signal's handler between two bytecodes of the main thread, and inside an at-fork hook (logging's) the
    KeyboardInterrupt it raises is printed and swallowed, so the run would go on. Blocking the main thread's
    signal mask is not enough (another thread may take the signal and trip the same handler), so the handlers
    only note the signal while the workers start; it is then raised again, after the workers are shut down."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    noted: list[int] = []
    held = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    held = {signum: handler for signum, handler in held.items() if callable(handler)}
    for signum in held:
        signal.signal(signum, lambda number, frame: noted.append(number))
    try:
        batches = iter(loader)
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
    if noted:
        _shut_down(batches)
        signal.raise_signal(noted[0])  # the script's own handler raises it here, as it would have at the fork
    return batches


def image_batches(paths: Sequence[Path], batch_size: int, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches (lists) of :class:`ImageRecord`, decoded by ``workers`` processes in order; with ``pin_memory``
    (GPU runs) each record's pixels also come as a tensor in page-locked memory."""
    return DataLoader(ImageFiles(paths, tensors=pin_memory), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, collate_fn=_as_list, persistent_workers=False,
                      worker_init_fn=ignore_interrupts if workers else None)
