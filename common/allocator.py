"""Keep freed tensor memory inside the process (CPU runs on Linux/glibc).

glibc's malloc serves every buffer above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
with a fresh ``mmap`` and gives it back to the OS on ``free``; it also trims the heap top above 128 KiB.
A CNN forward allocates and frees the same large activation buffers on every batch, so each batch faults
them in again page by page: measured here, a no-grad forward of UCAG's 36 crops spent as long in the
kernel as in PyTorch. Raising both thresholds (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``)
keeps freed buffers in the heap for the next batch.

The scripts call :func:`keep_freed_memory` at start-up; Python API users call it once themselves:

    from common.allocator import keep_freed_memory; keep_freed_memory()

Opt out with ``UCAG_SYSTEM_MALLOC=1``. Elsewhere (macOS, Windows, musl) and when jemalloc or tcmalloc is
preloaded it changes nothing. GPU memory is unaffected (PyTorch's caching allocator already keeps it).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 2 ** 31 - 1  # the largest value mallopt takes (an int): buffers up to 2 GiB stay in the heap
OPT_OUT = "UCAG_SYSTEM_MALLOC"

_state: str | None = None


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds once per process; returns what was done, in words."""
    global _state
    if _state is None:
        _state = _configure()
    return _state


def _configure() -> str:
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return f"unchanged ({OPT_OUT} is set)"
    if not sys.platform.startswith("linux"):
        return f"unchanged (not Linux: {sys.platform})"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "unchanged (jemalloc/tcmalloc preloaded)"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unchanged (not glibc)"
    version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (mallopt(M_MMAP_THRESHOLD, THRESHOLD) and mallopt(M_TRIM_THRESHOLD, THRESHOLD)):
        return "unchanged (mallopt refused the thresholds)"
    return f"glibc {version().decode()}: freed buffers up to 2 GiB kept in the process"
