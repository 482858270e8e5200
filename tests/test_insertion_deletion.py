"""Insertion/deletion games: AUC, a toy model with a known perfect map, and agreement of the batched
games with a straightforward one-step-at-a-time implementation (RISE style) on real photos."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from evaluation.insertion_deletion import auc, game_curves, insertion_substrate, num_points, saliency_ranks
from methods import build_explainer, finalize_maps


def test_auc_of_hand_made_curves():
    assert float(auc(torch.tensor([1.0, 1.0, 1.0]))) == 1.0
    assert float(auc(torch.tensor([1.0, 0.0]))) == 0.5
    assert math.isclose(float(auc(torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))), 0.75)
    curves = torch.tensor([[0.2, 0.4, 0.8], [1.0, 0.5, 0.0]])
    assert torch.allclose(auc(curves), torch.tensor([(0.1 + 0.4 + 0.4) / 2, 0.5]))
    assert num_points(224 * 224, 224 * 8) == 29 and num_points(10, 3) == 5


def test_ranks_are_descending_with_stable_ties():
    saliency = torch.tensor([[[0.5, 1.0, 0.5], [0.0, 0.5, 2.0]]])
    assert saliency_ranks(saliency).tolist() == [[2, 1, 3, 5, 4, 0]]


class RegionModel(torch.nn.Module):
    """Class-1 logit = 0.5 * sum of channel 0 over the top-left 4 x 4 region; class 0 logit = 0."""

    def forward(self, x):
        score = 0.5 * x[:, 0, :4, :4].sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_toy_model_perfect_map_gives_the_known_curves():
    x = torch.zeros(1, 3, 8, 8)
    x[:, :, :4, :4] = 1.0
    perfect = torch.zeros(1, 8, 8)
    perfect[:, :4, :4] = 1.0
    targets = torch.tensor([1])
    full = 1 / (1 + math.exp(-8.0))  # sigmoid(0.5 * 16)
    deletion = game_curves(RegionModel(), x, perfect, targets, "deletion", step=16)
    assert torch.allclose(deletion, torch.tensor([[full, 0.5, 0.5, 0.5, 0.5]]), atol=1e-6)
    inverse = game_curves(RegionModel(), x, 1 - perfect, targets, "deletion", step=16)
    assert torch.allclose(inverse, torch.tensor([[full, full, full, full, 0.5]]), atol=1e-6)
    insertion = game_curves(RegionModel(), x, perfect, targets, "insertion", step=16,
                            substrate=torch.zeros_like)
    assert torch.allclose(insertion, torch.tensor([[0.5, full, full, full, full]]), atol=1e-6)
    # the perfect map beats every random map in both games
    torch.manual_seed(0)
    for _ in range(5):
        random_map = torch.rand(1, 8, 8)
        assert auc(deletion) <= auc(game_curves(RegionModel(), x, random_map, targets, "deletion", 16))
        assert auc(insertion) >= auc(game_curves(RegionModel(), x, random_map, targets, "insertion", 16,
                                                 substrate=torch.zeros_like))


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 224, 224), (1, 3, 30, 100)])
def test_insertion_substrate_is_the_papers_blur(shape):
    x = torch.randn(*shape)
    kernel = min(51, 2 * (min(shape[-2:]) // 2) - 1)
    expected = gaussian_blur(x, [kernel, kernel], [50.0, 50.0])
    assert torch.allclose(insertion_substrate(x), expected, rtol=0, atol=1e-6)


class RecordingModel(torch.nn.Module):
    """Keeps a copy of every input; a 3 x 3 convolution whose weight layout sets the model's memory format."""

    def __init__(self, memory_format):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=memory_format)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.conv(x).mean(dim=(2, 3))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_perturbed_images_are_exact_in_either_memory_format(mode, memory_format):
    """Every scored image equals start with exactly the first count pixels (by rank) taken from finish,
    across chunk boundaries inside an image, in the model's memory format."""
    torch.manual_seed(0)
    images, saliency = torch.randn(3, 3, 9, 7), torch.rand(3, 9, 7)
    saliency[0, :2] = 0.5  # ties
    model = RecordingModel(memory_format)
    step, points = 5, num_points(63, 5)
    game_curves(model, images, saliency, torch.zeros(3, dtype=torch.long), mode, step, forward_batch=4)
    scored = torch.cat(model.seen)
    assert scored.shape[0] == 3 * points
    assert scored.is_contiguous(memory_format=memory_format)
    start = images if mode == "deletion" else insertion_substrate(images)
    finish = torch.zeros_like(images) if mode == "deletion" else images
    ranks = saliency_ranks(saliency).view(3, 1, 9, 7)
    for index in range(3 * points):
        image, point = divmod(index, points)
        expected = torch.where(ranks[image] < min(point * step, 63), finish[image], start[image])
        assert torch.equal(scored[index], expected), (image, point)


def reference_curve(model, image, saliency, target, mode, step):
    """One image, one step at a time, NumPy bookkeeping: the RISE reference loop."""
    _, height, width = image.shape
    start = image.clone() if mode == "deletion" else insertion_substrate(image[None])[0]
    finish = torch.zeros_like(image) if mode == "deletion" else image.clone()
    order = np.argsort(-saliency.flatten().numpy(), kind="stable")
    points = int(np.ceil(height * width / step)) + 1
    scores = []
    for i in range(points):
        with torch.no_grad():
            scores.append(float(torch.softmax(model(start[None]), 1)[0, target]))
        rows, cols = np.unravel_index(order[step * i: step * (i + 1)], (height, width))
        start[:, rows, cols] = finish[:, rows, cols]
    return torch.tensor(scores)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_batched_games_equal_the_step_by_step_reference(mode, lite, photo_batch):
    maps, logits = build_explainer("gradcam", lite)(photo_batch)
    saliency = finalize_maps(maps, (224, 224))[:, 0]
    targets = logits.argmax(1)
    step = 224 * 40
    batched = game_curves(lite.model, photo_batch, saliency, targets, mode, step, forward_batch=7)
    for i in range(len(photo_batch)):
        expected = reference_curve(lite.model, photo_batch[i], saliency[i], int(targets[i]), mode, step)
        assert torch.allclose(batched[i], expected, atol=1e-6, rtol=0), (batched[i], expected)
