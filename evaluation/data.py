"""Reading image files in background workers; unreadable files become records with an error."""
from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


class ImageFiles(Dataset):
    """Decodes image files to uint8 RGB; never raises for a bad file."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageRecord:
        path = self.paths[index]
        try:
            return ImageRecord(index, path, image=load_rgb(path))
        except ImageError as exc:
            return ImageRecord(index, path, error=str(exc))


def _as_list(records: list[ImageRecord]) -> list[ImageRecord]:
    return records


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the terminal sends SIGINT to the whole process group, and the main
    process alone stops the run and shuts its workers down (promptly, instead of waiting for dead ones)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def image_batches(paths: Sequence[Path], batch_size: int, workers: int = 0) -> DataLoader:
    """Batches (lists) of :class:`ImageRecord`, decoded by ``workers`` processes in order."""
    return DataLoader(ImageFiles(paths), batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=_as_list, persistent_workers=False,
                      worker_init_fn=ignore_interrupts if workers else None)
