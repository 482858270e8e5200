"""UCAG's conquer step: confidence weights, duplication averaging, chunking, official mode."""
import math

import pytest
import torch

from methods import Explainer, Explanation, build_explainer, finalize_maps
from ucag import OFFICIAL, UCAG, CropGrid, crop_confidence


class PatchStub(Explainer):
    """A fake explainer: map = constant per crop (its mean pixel value); logits set per crop."""

    def __init__(self, logits_for_crop, map_size=None):
        super().__init__(torch.nn.Identity())
        self.logits_for_crop = logits_for_crop
        self.map_size = map_size
        self.seen = []

    def explain(self, x, targets):
        self.seen.append((x.shape, targets.clone()))
        value = x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        size = self.map_size or (3, 3)
        return Explanation(value.expand(-1, 1, *size).clone(), self.logits_for_crop(x))


class ImageLogits(torch.nn.Module):
    """A 'model' for UCAG's full-image forward: fixed logits favouring class 1."""

    def forward(self, x):
        return torch.tensor([[0.0, 5.0]]).expand(x.shape[0], 2)


def make_ucag(stub, **kwargs):
    ucag = UCAG(stub, **kwargs)
    ucag.model = ImageLogits()
    return ucag


def test_patch_confidence_is_exp_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    targets = torch.tensor([1, 0])
    expected = torch.softmax(logits, 1)[[0, 1], [1, 0]].exp()
    assert torch.allclose(crop_confidence(logits, targets), expected)


def test_two_patches_follow_exp_softmax_weights_exactly():
    # alpha = 1: crops reach the explainer unscaled, so each partial map is the crop's mean value
    height, width, crop = 8, 8, 168  # crop side int(168 * 8 / 224) = 6 -> starts 0 and 2 on each axis
    grid = CropGrid(height, width, crop=crop, n=2)
    assert grid.crop_size == (6, 6) and grid.row_starts == [0, 2]
    x = torch.zeros(1, 3, height, width)
    x[..., :, :4] = 1.0  # left half bright

    def logits_for_crop(crops):
        # confident in class 1 for crops of the left column, unsure for the right ones
        left = crops.mean(dim=(1, 2, 3)) > 0.5
        return torch.stack([torch.zeros_like(left, dtype=torch.float),
                            torch.where(left, torch.tensor(4.0), torch.tensor(0.0))], dim=1)

    stub = PatchStub(logits_for_crop)
    ucag = make_ucag(stub, crop=crop, n=2, alpha=1.0)
    maps, logits = ucag(x, torch.tensor([1]))
    crops = grid.unfold(x)
    values = crops.mean(dim=(1, 2, 3))
    weights = torch.softmax(logits_for_crop(crops), 1)[:, 1].exp()
    expected = grid.fold((values * weights).view(-1, 1, 1).expand(-1, 6, 6)) / grid.duplication()
    assert torch.allclose(maps, expected, atol=1e-6)
    # pixel (0, 7) lies only in crop (0, 1); pixel (3, 3) in all four crops
    assert math.isclose(float(maps[0, 0, 0, 7]), float(values[1] * weights[1]), rel_tol=1e-6)
    assert math.isclose(float(maps[0, 0, 3, 3]), float((values * weights).mean()), rel_tol=1e-6)
    assert torch.equal(logits, ImageLogits()(x))
    # every crop is explained for the image's target, at alpha-scaled size
    assert all(targets.tolist() == [1] * len(targets) for _, targets in stub.seen)


def test_no_confidence_and_official_divisor():
    x = torch.rand(1, 3, 16, 16)
    stub_logits = lambda crops: torch.randn(crops.shape[0], 2)  # noqa: E731 - random confidences
    grid = CropGrid(16, 16, crop=112, n=3)
    crops = grid.unfold(x)
    values = crops.mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, *grid.crop_size)
    uniform = make_ucag(PatchStub(stub_logits), crop=112, n=3, alpha=1.0, confidence=False)(x, [1]).maps
    assert torch.allclose(uniform, grid.fold(values) / grid.duplication(), atol=1e-6)
    official = make_ucag(PatchStub(stub_logits), crop=112, n=3, alpha=1.0, official=True)
    assert official.confidence is False
    assert torch.allclose(official(x, [1]).maps, grid.fold(values) / (grid.duplication() + 1), atol=1e-6)


def test_chunk_size_does_not_change_the_result(lite, photo_batch):
    explainer = build_explainer("gradcam", lite)
    x = photo_batch[:2]
    whole = UCAG(explainer, n=3, alpha=1.2, patch_batch=64)(x).maps
    chunked = UCAG(explainer, n=3, alpha=1.2, patch_batch=5)(x).maps
    assert torch.allclose(whole, chunked, rtol=1e-4, atol=1e-6)


def test_batch_of_images_equals_one_at_a_time(lite, photo_batch):
    ucag = UCAG(build_explainer("xgradcam", lite), n=3, alpha=1.2)
    targets = torch.tensor([285, 967, 1, 500])
    batched = ucag(photo_batch, targets).maps
    for i in range(len(targets)):
        single = ucag(photo_batch[i:i + 1], targets[i:i + 1]).maps
        assert torch.allclose(batched[i:i + 1], single, rtol=1e-4, atol=1e-6)


def test_input_resolution_maps_are_folded_too():
    x = torch.rand(2, 3, 30, 40)
    stub = PatchStub(lambda crops: torch.zeros(crops.shape[0], 2), map_size=None)
    stub.map_size = (40, 50)  # larger than the crop: shrunk back like an input-level relevance map
    maps = make_ucag(stub, crop=150, n=3, alpha=1.5, confidence=False)(x, [0, 1]).maps
    grid = CropGrid(30, 40, crop=150, n=3)
    scaled = torch.nn.functional.interpolate(grid.unfold(x), size=(30, 39), mode="bicubic", align_corners=False)
    values = scaled.mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, *grid.crop_size)
    assert maps.shape == (2, 1, 30, 40)
    assert torch.allclose(maps, grid.fold(values) / grid.duplication(), atol=1e-5)


def test_ucag_runs_on_non_square_input_and_covers_every_pixel(lite):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 230, 301)
    maps = UCAG(build_explainer("gradcam", lite), n=6, alpha=1.0)(x).maps
    assert maps.shape == (1, 1, 230, 301)
    assert torch.isfinite(maps).all()
    final = finalize_maps(maps, (115, 150))
    assert final.shape == (1, 1, 115, 150) and float(final.min()) == 0.0 and float(final.max()) == 1.0


def test_finalize_guards_constant_maps_and_official_blur_stays_in_range():
    constant = torch.full((2, 1, 7, 7), 3.0)
    assert torch.equal(finalize_maps(constant, (20, 20)), torch.zeros(2, 1, 20, 20))
    negative = -torch.rand(1, 1, 7, 7)
    assert torch.equal(finalize_maps(negative), torch.zeros(1, 1, 7, 7))  # ReLU leaves nothing: no NaN
    blurred = OFFICIAL.finalize(torch.randn(1, 1, 32, 32), (64, 48))
    assert blurred.shape == (1, 1, 64, 48) and 0 <= float(blurred.min()) and float(blurred.max()) <= 1


def test_bad_parameters_raise():
    stub = PatchStub(lambda crops: torch.zeros(crops.shape[0], 2))
    with pytest.raises(ValueError):
        UCAG(stub, alpha=0)
    with pytest.raises(ValueError):
        UCAG(stub, patch_batch=0)


def test_targets_are_range_checked_once_per_call_not_once_per_chunk(lite, monkeypatch):
    """The check reads the targets back from the device (a host sync): UCAG does it once, and its chunks
    (5 here) run the inner explainer without it; out-of-range targets still raise before any chunk runs."""
    import methods.base as base

    checked = []
    check = base.check_target_range
    monkeypatch.setattr(base, "check_target_range", lambda t, k: checked.append(len(t)) or check(t, k))
    gradcam = build_explainer("gradcam", lite)
    ucag = UCAG(gradcam, crop=150, n=3, alpha=1.0, patch_batch=2)
    x = torch.randn(2, 3, 64, 64)
    ucag(x, [3, 7])
    assert checked == [2]
    ucag(x)  # the predictions need no check
    assert checked == [2]
    with pytest.raises(ValueError, match="out of range"):
        ucag(x, [3, 1000])
    assert checked == [2, 2]

    class Boom(Explainer):
        def explain(self, x, targets):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Boom(lite.model).explain_resolved(x, torch.tensor([3, 7]))
    with pytest.raises(ValueError, match="out of range"):  # the trust ends with each internal call
        gradcam(x, [3, 1000])


class CountingLogits(torch.nn.Module):
    """ImageLogits that records the batch shapes it is called on."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return torch.tensor([[0.0, 5.0]]).expand(x.shape[0], 2)


def test_known_logits_skip_the_image_forward_and_change_nothing():
    stub = PatchStub(lambda crops: torch.tensor([[0.0, 2.0]]).expand(crops.shape[0], 2))
    ucag = UCAG(stub, crop=124, n=3, alpha=1.0, patch_batch=4)
    ucag.model = CountingLogits()
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 0])
    plain = ucag(x, targets)
    assert ucag.model.shapes == [(2, 3, 32, 40)]
    known = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    reused = ucag.explain_blends(x, targets, ("constant", "gaussian"), logits=known)
    assert ucag.model.shapes == [(2, 3, 32, 40)]  # no second forward of the images
    assert torch.equal(reused["constant"].maps, plain.maps) and reused["constant"].logits is known
    with pytest.raises(ValueError, match="do not belong to a batch of 2"):
        ucag.explain_blends(x, targets, ("constant",), logits=known[:1])


def test_evaluation_rows_pass_the_first_rows_logits_to_ucag(lite, photo_batch):
    from evaluation.rows import Row

    x = photo_batch[:2]
    base = Row("gradcam", build_explainer("gradcam", lite))
    ucag_row = Row("gradcam*", UCAG(build_explainer("gradcam", lite), n=2, alpha=1.0), ucag=True)
    first = base.explain(x, None)
    targets = first.logits.argmax(dim=1)
    calls = []
    handle = lite.model.register_forward_pre_hook(lambda module, inputs: calls.append(inputs[0].shape[-1]))
    try:
        reused = ucag_row.explain(x, targets, first.logits)
    finally:
        handle.remove()
    assert x.shape[-1] not in calls and reused.logits is first.logits
    torch.testing.assert_close(reused.maps, ucag_row.explainer(x, targets).maps, rtol=0, atol=0)


def test_crop_input_resizes_every_crop_to_the_models_fixed_size():
    stub = PatchStub(lambda crops: torch.tensor([[0.0, 2.0]]).expand(crops.shape[0], 2))
    ucag = make_ucag(stub, crop=124, n=3, alpha=2.6, patch_batch=4, crop_input=(16, 16))
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    maps = ucag(x, 1).maps
    assert {shape[-2:] for shape, _ in stub.seen} == {(16, 16)} and maps.shape == (1, 1, 32, 40)
    assert ucag.scaled_size(ucag.grid(32, 40)) == (16, 16) and "crop_input=(16, 16)" in repr(ucag)
    assert make_ucag(stub, crop=124, n=3, alpha=2.6).scaled_size(ucag.grid(32, 40)) == (44, 57)  # int(17 * 2.6)
    with pytest.raises(ValueError, match="crop_input"):
        UCAG(stub, crop_input=(0, 16))


def test_fixed_input_models_get_crop_input_and_a_warning():
    from argparse import Namespace

    from app.setup import fixed_crop_input
    from models import ModelSpec

    args = Namespace(crop_size=124, num_patches=6, alpha=2.6)
    spec = ModelSpec("vit_b_16", torch.nn.Identity(), "", ["a"], fixed_input=True)
    with pytest.warns(UserWarning, match="takes 224x224 inputs only.*instead of alpha \\* crop = 322x322"):
        assert fixed_crop_input(args, spec) == (224, 224)
    assert fixed_crop_input(args, ModelSpec("resnet50", torch.nn.Identity(), "", ["a"])) is None
