"""Out of memory in a chunked loop: the chunk is halved and retried, the maps and curves do not change, one
note says so, and the size that fit is kept for the next loop."""
import copy
import warnings

import pytest
import torch
from torch import nn

from evaluation.insertion_deletion import game_curves
from methods import GradCAM
from methods.batching import run_chunks
from methods.perturbation import RISE, ScoreCAM
from methods.sise import SISE
from ucag import UCAG

pytestmark = pytest.mark.usefixtures("one_thread")


class Capped(nn.Module):
    """A small CNN whose forward raises torch.OutOfMemoryError for batches above ``limit`` (None: never)."""

    def __init__(self, limit=None):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        self.limit, self.sizes = limit, []
        self.eval()

    def forward(self, x):
        self.sizes.append(len(x))
        if self.limit is not None and len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {len(x)} (test)")
        return self.head(self.features(x))


def capped(limit):
    """The unconstrained model's twin (same weights) that runs out of memory above ``limit``."""
    model = copy.deepcopy(Capped())
    model.limit = limit
    return model


def oom_notes(caught):
    return [str(w.message) for w in caught if "out of memory" in str(w.message)]


def run_twice(build, call, limit=3):
    """call(build(model)) on an unconstrained model and twice on a capped one; the results, the capped model and
    the notes of its first and second run."""
    expected = call(build(Capped()))
    model = capped(limit)
    explainer = build(model)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        result = call(explainer)
    model.sizes.clear()
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        again = call(explainer)
    assert max(model.sizes) <= limit  # the second loop starts at the size that fit
    assert torch.equal(again, result)
    return expected, result, oom_notes(first), oom_notes(second)


def test_run_chunks_halves_retries_and_keeps_the_size_that_fit():
    model, calls, done = nn.Identity(), [], []

    def step(start, stop):
        calls.append((start, stop))
        if stop - start > 3:
            raise torch.OutOfMemoryError("test")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_chunks(10, 8, step, model, "key", "things", done.append)
    assert calls == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert done == [2, 2, 2, 2, 2]
    assert oom_notes(caught) == ["out of memory in chunks of 8 things: continued in chunks of 2"]
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_chunks(4, 8, step, model, "key")
        run_chunks(4, 8, step, model, "another key")  # another kind of work starts at its own size
    assert calls == [(0, 2), (2, 4), (0, 4), (0, 2), (2, 4)]
    assert oom_notes(caught) == ["out of memory in chunks of 8 inputs: continued in chunks of 2"]


def test_a_chunk_of_one_that_does_not_fit_raises():
    calls = []

    def step(start, stop):
        calls.append(stop - start)
        raise torch.OutOfMemoryError("test")

    with pytest.raises(torch.OutOfMemoryError):
        run_chunks(5, 4, step, nn.Identity(), "key")
    assert calls == [4, 2, 1]


def test_other_errors_are_not_retried():
    calls = []

    def step(start, stop):
        calls.append(stop - start)
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        run_chunks(5, 4, step, nn.Identity(), "key")
    assert calls == [4]


def test_ucag_maps_are_identical_after_halving():
    x = torch.randn(2, 3, 24, 24)

    def build(model):
        return UCAG(GradCAM(model, model.features[4]), n=3, alpha=1.5, patch_batch=18)

    expected, maps, first, second = run_twice(build, lambda ucag: ucag(x, [1, 3]).maps)
    assert torch.equal(maps, expected)
    assert first == ["out of memory in chunks of 18 UCAG crops: continued in chunks of 2"] and second == []


def test_insertion_deletion_curves_are_identical_after_halving():
    x, saliency = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    targets = torch.tensor([0, 4])

    def call(model):
        return game_curves(model, x, saliency, targets, "deletion", step=8, forward_batch=9)

    expected, curves, first, second = run_twice(lambda model: model, call, limit=4)
    assert torch.equal(curves, expected)
    assert first == ["out of memory in chunks of 9 perturbed images: continued in chunks of 4"] and second == []


@pytest.mark.parametrize("method", ["scorecam", "rise", "sise"])
def test_mask_scoring_is_identical_after_halving(method):
    x = torch.randn(2, 3, 16, 16)
    builders = {
        "scorecam": lambda model: ScoreCAM(model, model.features[4], mask_batch=12),
        "rise": lambda model: RISE(model, n_masks=12, cell=3, mask_batch=12),
        "sise": lambda model: SISE(model, ["features.1", "features.4"], mask_batch=12),
    }
    expected, maps, first, second = run_twice(builders[method], lambda explainer: explainer(x, [1, 3]).maps)
    if method == "rise":  # the masks' weighted sum is added chunk by chunk: the same up to float rounding
        assert torch.allclose(maps, expected, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(maps, expected)
    assert len(first) == 1 and first[0].startswith("out of memory in chunks of 12 ") and second == []
    assert first[0].endswith(("continued in chunks of 3", "continued in chunks of 2"))
