"""GPU input path, checked on a CPU: decoded pixels as tensors for a pinning DataLoader, pinned records,
and page-locked, non-blocking copies to a CUDA device (the CUDA calls are recorded, not run); with
``--device cuda`` the same path for real."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.data import ImageFiles, ImageRecord, image_batches
from models import preprocess
from models.preprocessing import to_tensor
from tests.conftest import EXAMPLES


def test_records_carry_the_pixels_as_a_tensor_when_asked():
    path = sorted(EXAMPLES.iterdir())[0]
    plain, with_tensor = ImageFiles([path])[0], ImageFiles([path], tensors=True)[0]
    assert plain.pixels is None and plain.input is plain.image
    assert with_tensor.input is with_tensor.pixels
    assert np.array_equal(with_tensor.pixels.numpy(), with_tensor.image)
    batch = next(iter(image_batches([path], 1, 0, pin_memory=False)))
    assert batch[0].pixels is None


def test_preprocess_of_a_tensor_equals_preprocess_of_the_array(lite, photos):
    tensors = [torch.from_numpy(photo) for photo in photos[:2]]
    assert torch.equal(preprocess(tensors, lite, "cpu"), preprocess(photos[:2], lite, "cpu"))


def test_a_pinning_loader_pins_each_records_pixels(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: pinned.append(self) or self.clone())
    record = ImageRecord(0, EXAMPLES / "x.png", image=np.zeros((2, 2, 3), np.uint8),
                         pixels=torch.zeros(2, 2, 3, dtype=torch.uint8))
    copy = record.pin_memory()
    assert len(pinned) == 1 and copy.pixels is not record.pixels and copy.image is record.image
    assert ImageRecord(1, EXAMPLES / "bad.png", error="unreadable").pin_memory().error == "unreadable"


def test_copies_to_a_gpu_are_pinned_and_non_blocking(monkeypatch):
    calls = []
    original_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            calls.append(("to", kwargs.get("non_blocking")))
            return self
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: calls.append(("pin",)) or self.clone())
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args: False)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    image = np.full((4, 5, 3), 255, np.uint8)
    result = to_tensor(image, "cuda")
    assert calls == [("pin",), ("to", True)]
    assert result.shape == (3, 4, 5) and bool((result == 1).all())
    calls.clear()
    to_tensor(image, "cpu")
    assert calls == []  # CPU runs neither pin nor copy asynchronously


@pytest.fixture
def gpu(device) -> torch.device:
    if device.type != "cuda":
        pytest.skip("runs with --device cuda (benchmarks/gpu_check.sh)")
    return device


def test_a_pinning_loader_on_a_gpu_delivers_page_locked_pixels(gpu):
    paths = sorted(EXAMPLES.iterdir())[:2]
    records = next(iter(image_batches(paths, 2, 0, pin_memory=True)))
    assert all(record.pixels.is_pinned() for record in records)
    for record in records:
        on_gpu = to_tensor(record.input, gpu)
        torch.cuda.synchronize(gpu)  # the copy is asynchronous
        assert on_gpu.device == gpu
        assert torch.equal(on_gpu.cpu(), to_tensor(record.image, "cpu"))


def test_preprocess_on_a_gpu_equals_the_cpu(gpu, lite, photos):
    on_gpu = preprocess(photos[:2], lite, gpu)
    assert on_gpu.device == gpu
    expected = preprocess(photos[:2], lite, "cpu")
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=0, atol=1e-4)  # the resize kernels round differently
