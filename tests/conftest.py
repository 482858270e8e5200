"""Shared fixtures: the embedded trained model, a seeded random resnet50, the bundled photos, and the
``--device`` option: where the device-aware tests (device placement, precision, pinned memory) run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from common.images import load_rgb
from models import load_model, preprocess

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the device-aware tests (test_device_placement, test_precision, "
                          "test_pinned_memory): cpu (default), cuda or cuda:N")


def parse_device(name: str) -> torch.device:
    """The ``--device`` value, checked: a CUDA device must exist (a usage error, not 100 failures)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {name}: the tests run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: no CUDA GPU is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise pytest.UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
    return device



def pytest_configure(config):
    device = parse_device(config.getoption("--device"))
    if device.type == "cuda":
        # Deterministic kernels where CUDA has them, so that tests comparing two runs exactly compare the code,
        # not atomics' summation order; cuBLAS needs its workspace setting before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The ``--device`` the device-aware tests run on; on CUDA with fp32's switches (TF32 off), as the scripts."""
    device = parse_device(request.config.getoption("--device"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return device


@pytest.fixture(scope="session")
def lite():
    """EfficientNet-Lite0 with its real ImageNet weights."""
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def resnet_random():
    torch.manual_seed(0)
    return load_model("resnet50", "random")


@pytest.fixture(scope="session")
def photos() -> list:
    return [load_rgb(path) for path in sorted(EXAMPLES.iterdir())]


@pytest.fixture(scope="session")
def photo_batch(lite, photos) -> torch.Tensor:
    """The bundled photos as one normalised 224 x 224 batch."""
    return preprocess(photos, lite, "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they gain nothing from a second thread, which mostly waits on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
