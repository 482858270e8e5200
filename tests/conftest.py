"""Shared fixtures: the embedded trained model, a seeded random resnet50, and the bundled photos."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.images import load_rgb
from models import load_model, preprocess

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


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
