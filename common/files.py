"""Writing result files safely: never a half-written file under its final name (a crash or a full disk
leaves the previous file or none), any file name (also bytes that are not UTF-8), and a one-line
:class:`common.errors.OutputError` instead of a traceback when the disk refuses."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from common.errors import OutputError
from common.images import display_path


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it, then rename it into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        raise OutputError(f"cannot write {display_path(path)}: {exc.strerror or exc}") from None


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` (exactly that name, no '.npy' appended), atomically."""
    write_atomic(path, lambda handle: np.save(handle, array))


def save_png(path: Path, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 RGB array as a PNG file, atomically (encoded in memory: OpenCV never sees the path)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OutputError(f"cannot encode {path} as PNG")
    write_atomic(path, lambda handle: handle.write(encoded.tobytes()))


def write_text(path: Path, text: str) -> None:
    """A UTF-8 text file, atomically (file names in it go through :func:`common.images.display_path`)."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))
