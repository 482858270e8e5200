"""Number formats a run computes in: ``--precision fp32|tf32|bf16``.

fp32  float32 everywhere; on CUDA TF32 is switched off for matrix products and convolutions (PyTorch's
      own default leaves it on for cuDNN convolutions), so GPU numbers match CPU ones to float rounding.
tf32  float32 tensors, TF32 tensor cores for CUDA matrix products and convolutions (10-bit mantissa
      inside the products, about 1e-3 relative). Changes nothing on a CPU.
bf16  autocast to bfloat16 (8-bit mantissa) for the forwards and the explainers' backward passes; maps,
      probabilities and everything after them stay float32. Explainers whose arithmetic is not safe in
      bfloat16 (the relevance propagation rules divide by small sums) opt out and run in float32
      (``Explainer.mixed_precision = False``).

The paper's numbers are fp32, the default. The README gives the differences bf16 makes, measured on CPU.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.errors import ToolkitError

PRECISIONS = ("fp32", "tf32", "bf16")


class PrecisionError(ToolkitError):
    """A precision the device cannot run."""


@dataclass(frozen=True)
class Precision:
    """name: fp32, tf32 or bf16; device: where the model runs."""

    name: str = "fp32"
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise PrecisionError(f"unknown precision '{self.name}'; valid: {', '.join(PRECISIONS)}")
        if self.name == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PrecisionError(f"--precision bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16 "
                                 "support (use fp32 or tf32)")

    def apply(self) -> None:
        """Set the process-wide TF32 switches of the CUDA backends (on for tf32, off otherwise)."""
        tf32 = self.name == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The region forwards and explainers run in: bfloat16 autocast for bf16, plain float32 otherwise."""
        if self.name != "bf16":
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield

    def describe(self) -> str:
        """The run identity's text: 'float32' (+ ', bf16 autocast'; + the TF32 switches on CUDA)."""
        text = "float32" + (", bf16 autocast" if self.name == "bf16" else "")
        if self.device.type == "cuda":
            text += (f", tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
                     f"tf32 cudnn {torch.backends.cudnn.allow_tf32}")
        return text


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Switch autocast off inside an autocast region (explainers that must compute in float32)."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
