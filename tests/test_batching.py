"""Batch sizes from free memory: the activation measurement on a hand-sized network, the arithmetic, even
chunks, and UCAG / Score-CAM / the games choosing their chunks when none is given."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import methods.batching as batching
from evaluation.insertion_deletion import game_curves
from methods import build_explainer
from methods.batching import activation_bytes, batch_for_memory, even_chunks, free_memory
from ucag import UCAG


def tiny_network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


def test_activation_bytes_of_a_hand_sized_network():
    # conv and relu: 4 x 8 x 8 float32 = 1024 bytes each; pool 16, flatten 16, linear 40
    assert activation_bytes(tiny_network(), (8, 8), torch.device("cpu")) == (1024 + 1024 + 16 + 16 + 40, 1024)


def test_batch_for_memory_arithmetic(monkeypatch):
    monkeypatch.setattr(batching, "free_memory", lambda device: 100_000)
    network, cpu = tiny_network(), torch.device("cpu")
    # with gradients: all outputs (2120) + twice the largest (2048) per input; half of 100 kB free
    assert batch_for_memory(network, (8, 8), cpu, gradients=True, ceiling=1000) == 50_000 // 4168
    assert batch_for_memory(network, (8, 8), cpu, gradients=False, ceiling=1000) == 50_000 // 3072
    assert batch_for_memory(network, (8, 8), cpu, gradients=False, ceiling=5) == 5
    monkeypatch.setattr(batching, "free_memory", lambda device: 10)
    assert batch_for_memory(network, (8, 8), cpu, gradients=True, ceiling=1000) == 1  # never 0
    monkeypatch.setattr(batching, "free_memory", lambda device: 10 ** 15)
    assert batch_for_memory(network, (8, 8), cpu, gradients=True) == batching.CEILING["cpu"]


def test_measurement_is_made_once_per_model_and_size(monkeypatch):
    network, calls = tiny_network(), []
    measure = batching._measure
    monkeypatch.setattr(batching, "_measure", lambda *args: calls.append(args) or measure(*args))
    for _ in range(3):
        activation_bytes(network, (8, 8), torch.device("cpu"))
    activation_bytes(network, (16, 16), torch.device("cpu"))
    assert len(calls) == 2


def test_even_chunks():
    assert even_chunks(36, 31) == 18 and even_chunks(36, 64) == 36 and even_chunks(36, 36) == 36
    assert even_chunks(100, 30) == 25 and even_chunks(7, 1) == 1 and even_chunks(0, 8) == 8


def test_free_memory_of_this_machine_is_plausible():
    free = free_memory(torch.device("cpu"))
    assert 0 < free <= 2 ** 50


@pytest.mark.parametrize("limit", [5, 64])
def test_ucag_chooses_even_chunks_and_the_same_maps(limit, lite, photo_batch, monkeypatch):
    x = photo_batch[:1]
    explainer = build_explainer("gradcam", lite)
    fixed = UCAG(explainer, n=6, alpha=1.0, patch_batch=36)(x).maps
    monkeypatch.setattr("ucag.framework.batch_for_memory", lambda *args, **kwargs: limit)
    sizes = []
    original = explainer.explain
    monkeypatch.setattr(explainer, "explain",
                        lambda chunk, targets: sizes.append(len(chunk)) or original(chunk, targets))
    automatic = UCAG(explainer, n=6, alpha=1.0)(x).maps
    assert sum(sizes) == 36 and max(sizes) == even_chunks(36, limit) <= limit
    assert torch.allclose(automatic, fixed, atol=1e-5, rtol=1e-4)


def test_scorecam_without_mask_batch_asks_the_memory(lite, photo_batch, monkeypatch):
    asked = []
    monkeypatch.setattr("methods.perturbation.batch_for_memory",
                        lambda model, size, device, gradients: asked.append((size, gradients)) or 256)
    x = torch.nn.functional.interpolate(photo_batch[:1], size=(64, 64))
    automatic = build_explainer("scorecam", lite)(x).maps
    assert asked == [((64, 64), False)]
    assert torch.allclose(automatic, build_explainer("scorecam", lite, mask_batch=7)(x).maps, atol=1e-5)


def test_games_without_forward_batch_use_even_chunks(monkeypatch):
    monkeypatch.setattr("evaluation.insertion_deletion.batch_for_memory", lambda *args, **kwargs: 4)
    seen = []

    class Counting(nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return x.mean(dim=(2, 3))

    game_curves(Counting(), torch.randn(1, 3, 6, 6), torch.rand(1, 6, 6), torch.zeros(1, dtype=torch.long),
                "deletion", step=6)
    assert sum(seen) == 7 and max(seen) == 4 and seen == [4, 3]
