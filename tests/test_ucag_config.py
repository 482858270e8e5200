"""UCAG's frozen, validated settings (ucag.config) and the protocols that own the official code's effects
(ucag.protocol), with the scripts' flags mapped onto them (app.setup)."""
import argparse
import dataclasses
import math

import pytest
import torch

from app.flags import UsageError
from app.setup import ucag_config
from common.errors import ToolkitError
from methods import finalize_maps
from tests.test_ucag import PatchStub, make_ucag
from ucag import OFFICIAL, PAPER, UCAG, CropGrid, UCAGConfig, UpscaledInput
from ucag.errors import BlendRefused, SettingError
from ucag.protocol import official_blur, protocol_for


def stub():
    return PatchStub(lambda crops: torch.randn(crops.shape[0], 2))


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("kwargs, setting", [
    ({"alpha": math.nan}, "alpha"), ({"alpha": math.inf}, "alpha"), ({"alpha": -2.0}, "alpha"),
    ({"alpha": True}, "alpha"), ({"n": 1}, "n"), ({"n": 3.0}, "n"), ({"crop": 0}, "crop"),
    ({"crop": math.nan}, "crop"), ({"crop": 224.5}, "crop"), ({"blend": "x"}, "blend"),
    ({"confidence": "yes"}, "confidence"), ({"confidence": 1}, "confidence"), ({"multilabel": 0}, "multilabel"),
    ({"crop_input": (0, 16)}, "crop_input"), ({"crop_input": "ab"}, "crop_input"),
    ({"crop_input": (16.5, 16)}, "crop_input"), ({"patch_batch": 0}, "patch_batch"),
    ({"patch_batch": 2.5}, "patch_batch"), ({"official": 1}, "official"),
])
def test_ucag_refuses_each_bad_setting_with_a_toolkit_error_naming_it(kwargs, setting):
    with pytest.raises(ToolkitError) as exc:
        UCAG(stub(), **kwargs)
    assert isinstance(exc.value, SettingError) and exc.value.setting == setting
    assert one_line(exc).startswith(f"{setting} must be ")


def test_official_protocol_refuses_the_gaussian_blend_with_a_toolkit_error():
    with pytest.raises(ToolkitError, match="blend='gaussian' is not the official code's fold") as exc:
        UCAG(stub(), official=True, blend="gaussian")
    assert isinstance(exc.value, BlendRefused) and exc.value.allowed == ("constant",)
    with pytest.raises(BlendRefused):
        UCAGConfig(blend="gaussian", protocol=OFFICIAL)
    official = make_ucag(stub(), official=True, crop=112, n=3, alpha=1.0)
    with pytest.raises(BlendRefused):
        official.explain_blends(torch.rand(1, 3, 16, 16), [1], ("gaussian",))
    assert UCAGConfig(blend="gaussian").blend == "gaussian"  # the paper's protocol allows every blend


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan, 0.0, "2"])
def test_upscaled_input_refuses_a_bad_alpha(alpha):
    with pytest.raises(ToolkitError, match="alpha must be positive and finite"):
        UpscaledInput(stub(), alpha)


def test_the_config_is_frozen_and_resolves_the_protocols_confidence_default():
    config = UCAGConfig(crop=112, n=3, alpha=2, crop_input=[8, 8])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = float("nan")
    assert config.alpha == 2.0 and isinstance(config.alpha, float) and config.crop_input == (8, 8)
    assert config.confidence is True and config.official is False
    official = UCAGConfig(protocol=OFFICIAL)
    assert official.confidence is False and official.official is True
    assert UCAGConfig(protocol=OFFICIAL, confidence=True).confidence is True
    assert dataclasses.replace(official, multilabel=True).confidence is False
    with pytest.raises(SettingError, match="protocol must be"):
        UCAGConfig(protocol="official")


def test_ucag_keywords_and_a_config_build_the_same_wrapper():
    keywords = UCAG(stub(), crop=112, n=3, alpha=1.5, official=True, confidence=True)
    config = UCAG(stub(), config=UCAGConfig(crop=112, n=3, alpha=1.5, protocol=OFFICIAL, confidence=True))
    chosen = UCAG(stub(), crop=112, n=3, alpha=1.5, protocol=OFFICIAL, confidence=True)
    assert keywords.config == config.config == chosen.config
    assert keywords.protocol is OFFICIAL and keywords.official and keywords.confidence
    assert repr(keywords).endswith("confidence=True, official=True, blend='constant')")
    assert UCAG(stub()).protocol is PAPER and UCAG(stub()).confidence is True
    with pytest.raises(SettingError, match="config must be"):
        UCAG(stub(), config={"n": 3})


def test_the_protocols_hold_the_official_codes_effects():
    gamma = CropGrid(32, 32, crop=150, n=3).duplication()
    assert PAPER.divisor(gamma) is gamma and torch.equal(OFFICIAL.divisor(gamma), gamma + 1)
    assert (PAPER.antialias, OFFICIAL.antialias) == (True, False)
    assert (PAPER.blur, OFFICIAL.blur) == (False, True)
    assert (PAPER.confidence_default, OFFICIAL.confidence_default) == (True, False)
    assert (PAPER.confidence(None), OFFICIAL.confidence(None), OFFICIAL.confidence(True)) == (True, False, True)
    assert (PAPER.confidence_after_resize, OFFICIAL.confidence_after_resize) == (False, True)
    assert PAPER.blends == ("constant", "gaussian") and OFFICIAL.blends == ("constant",)
    assert not PAPER.baseline_is_upscaled(2.6) and OFFICIAL.baseline_is_upscaled(2.6)
    assert not OFFICIAL.baseline_is_upscaled(1.0)
    assert protocol_for(True) is OFFICIAL and protocol_for(False) is PAPER


def test_the_official_blur_and_divisor_reach_the_maps():
    torch.manual_seed(0)
    maps = torch.rand(2, 1, 16, 16)
    assert torch.equal(OFFICIAL.finalize(maps, (24, 24)), finalize_maps(maps, (24, 24), blur=official_blur))
    assert torch.equal(PAPER.finalize(maps, (24, 24)), finalize_maps(maps, (24, 24)))
    assert not torch.equal(OFFICIAL.finalize(maps), PAPER.finalize(maps))
    assert not torch.equal(OFFICIAL.finalize_signed(maps - 0.5), PAPER.finalize_signed(maps - 0.5))
    grid = CropGrid(16, 16, crop=150, n=3)
    partial = torch.rand(grid.num_crops, *grid.crop_size)
    assert torch.equal(OFFICIAL.fold(grid, partial, "constant"), grid.fold(partial) / (grid.duplication() + 1))
    assert torch.equal(PAPER.fold(grid, partial, "constant"), grid.fold(partial) / grid.duplication())


def test_official_confidence_is_max_normalised_per_image():
    weights = torch.tensor([1.0, 2.0, 4.0, 3.0, 6.0, 1.5])
    normalised = OFFICIAL.normalise_confidence(weights, batch=2)
    assert torch.equal(normalised, torch.tensor([0.25, 0.5, 1.0, 0.5, 1.0, 0.25]))


def test_confidence_applied_as_the_protocol_says():
    """The paper multiplies each partial map by Y_s; the official code by Y_s / max_s Y_s per image, so an
    image whose crops are equally confident keeps its unweighted map under OFFICIAL only."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    even = PatchStub(lambda crops: torch.tensor([[0.0, 3.0]]).expand(crops.shape[0], 2))
    kwargs = {"crop": 150, "n": 3, "alpha": 1.0}
    official_plain = make_ucag(even, official=True, **kwargs)(x, [1]).maps
    official_score = make_ucag(even, official=True, confidence=True, **kwargs)(x, [1]).maps
    paper_plain = make_ucag(even, confidence=False, **kwargs)(x, [1]).maps
    paper_score = make_ucag(even, **kwargs)(x, [1]).maps
    assert torch.equal(official_plain, official_score)
    y = torch.softmax(torch.tensor([0.0, 3.0]), 0)[1].exp()
    assert torch.allclose(paper_score, paper_plain * y) and not torch.allclose(paper_score, paper_plain)


def flags(**given):
    values = {"crop_size": 124.0, "num_patches": 6, "alpha": 2.6, "patch_batch": None, "official": False,
              "no_confidence": False, "score": False, "blend": None}
    return argparse.Namespace(**(values | given))


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("no_confidence", [False, True])
@pytest.mark.parametrize("score", [False, True])
def test_the_confidence_flags_flip_the_protocols_default(official, no_confidence, score):
    config = ucag_config(flags(official=official, no_confidence=no_confidence, score=score))
    before = (False if no_confidence else None) if not official else bool(score)  # the scripts' old rule
    assert config.confidence == (not official if before is None else before)
    assert config.protocol is (OFFICIAL if official else PAPER)


@pytest.mark.parametrize("given, message", [
    ({"alpha": math.nan}, "-a/--alpha must be positive and finite (got nan)"),
    ({"num_patches": 1}, "-n/--num-patches must be an integer of at least 2 (got 1)"),
    ({"crop_size": 300.0}, "-c/--crop-size must be in (0, 224] (the crop side in the 224-px frame) (got 300.0)"),
    ({"patch_batch": 0}, "--patch-batch must be a positive integer (got 0)"),
    ({"official": True, "blend": "gaussian"},
     "--blend gaussian is not the official code's fold: drop --official or --blend"),
])
def test_the_librarys_refusals_are_worded_with_the_flags(given, message):
    with pytest.raises(UsageError) as exc:
        ucag_config(flags(**given))
    assert one_line(exc) == message
