"""``--deterministic``: the same inputs give bit-identical numbers on the same machine and software.

PyTorch's deterministic algorithms (an op without one is refused, not run nondeterministically), cuDNN's
autotuner off (it may pick another convolution algorithm per run) and cuBLAS's fixed workspace
(``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads before its first call). On a CPU the numbers are
already repeatable; the flag costs some speed on a GPU (no atomics-based kernels, no autotuning).
"""
from __future__ import annotations

import os

import torch

from common.errors import ToolkitError

CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_SETTINGS = (":4096:8", ":16:8")  # the two settings NVIDIA documents as deterministic
NO_DETERMINISTIC_KERNEL = "does not have a deterministic implementation"  # PyTorch's message for such an op


class DeterminismError(ToolkitError):
    """--deterministic cannot be honoured (a conflicting cuBLAS setting, an op without a deterministic kernel)."""


def make_deterministic() -> None:
    """Switch the process to deterministic kernels; call it before the first CUDA matrix product."""
    setting = os.environ.get(CUBLAS_VARIABLE)
    if setting is None:
        os.environ[CUBLAS_VARIABLE] = CUBLAS_SETTINGS[0]
    elif setting not in CUBLAS_SETTINGS:
        raise DeterminismError(f"--deterministic: {CUBLAS_VARIABLE}={setting} is set, but cuBLAS is deterministic "
                               f"only with {' or '.join(CUBLAS_SETTINGS)}; unset it or set one of those")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def explain_refusal(error: RuntimeError) -> DeterminismError | None:
    """The one-line error for PyTorch's refusal of an op that has no deterministic kernel; None for others."""
    text = str(error)
    if NO_DETERMINISTIC_KERNEL not in text:
        return None
    operation = text.split(NO_DETERMINISTIC_KERNEL)[0].strip().rstrip(",")
    return DeterminismError(f"--deterministic: {operation} has no deterministic kernel on this device; "
                            "drop --deterministic, or use another method or model")
