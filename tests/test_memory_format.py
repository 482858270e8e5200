"""channels_last (the scripts' default memory format) gives every method the maps it gives on a contiguous
model, up to float rounding, and the scripts put the model in the format asked for."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import visualization
from app.flags import MEMORY_FORMATS
from methods import available_methods, build_explainer
from methods.transformer import METHODS as TRANSFORMER
from models import load_model
from models.preprocessing import memory_format_of
from tests.vit_fixtures import tiny_vit_spec

RELEVANCE = {"lrp", "clrp", "sglrp", "rap", "rsp", "agf"}
MASKED = {"scorecam", "sise", "adasise"}
# excitation backprop divides by W+ x at every layer; the embedded model feeds signed BatchNorm outputs into
# its next convolution, where W+ x nears 0 and float32 rounding reaches ~1 % (float64: 1e-10): float64 ResNet
EXCITATION = {"mwp", "cmwp"}
OPTIONS = {"rise": {"n_masks": 40}, "igcam": {"steps": 4}, "cameras": {"resolutions": (96, 128)},
           "extremal": {"max_iter": 3}}


@pytest.fixture(scope="module")
def model_pairs():
    """(contiguous, channels_last) copies of the embedded model and of a random ResNet18 in float64: RAP and
    AGF on random weights turn float32 rounding into 1-30 % differences (their float32 and float64 maps
    differ that much), so only float64 can tell a layout bug from rounding there."""
    torch.manual_seed(0)
    pairs = {}
    for name, weights in (("efficientnet_lite0", "default"), ("resnet18", "random")):
        plain = load_model(name, weights)
        if name == "resnet18":
            plain.model.double()
        last = copy.deepcopy(plain)
        last.model.to(memory_format=torch.channels_last)
        assert memory_format_of(plain.model) == torch.contiguous_format
        assert memory_format_of(last.model) == torch.channels_last
        pairs[name] = plain, last
    plain = tiny_vit_spec()  # the transformer methods' model: only its patch embedding is 4-D
    plain.model.double()
    last = copy.deepcopy(plain)
    last.model.to(memory_format=torch.channels_last)
    assert memory_format_of(last.model) == torch.channels_last
    pairs["tiny_vit"] = plain, last
    return pairs


def pair_for(method):
    if method in RELEVANCE | EXCITATION:
        return "resnet18"
    return "tiny_vit" if method in TRANSFORMER else "efficientnet_lite0"


@pytest.mark.parametrize("method", available_methods())
def test_channels_last_gives_the_same_maps(method, model_pairs, photo_batch):
    plain, last = model_pairs[pair_for(method)]
    side = 64 if method in MASKED else 128  # one forward per channel: smaller inputs
    x = torch.nn.functional.interpolate(photo_batch[:1], size=(side, side), mode="bilinear", antialias=True)
    x = x.double() if pair_for(method) != "efficientnet_lite0" else x
    options = OPTIONS.get(method, {})
    expected, logits = build_explainer(method, plain, **options)(x)
    maps, last_logits = build_explainer(method, last, **options)(x)
    assert torch.allclose(last_logits, logits, atol=1e-4, rtol=1e-4)
    scale = expected.abs().max().clamp(min=1e-12)
    assert torch.allclose(maps / scale, expected / scale, atol=1e-4, rtol=0), (maps - expected).abs().max() / scale


@pytest.mark.parametrize("layout", sorted(MEMORY_FORMATS))
def test_scripts_set_the_memory_format(layout, tmp_path, monkeypatch):
    seen = []
    original = visualization.explain_batch
    monkeypatch.setattr(visualization, "explain_batch",
                        lambda setup, *args: seen.append(memory_format_of(setup.spec.model)) or original(setup, *args))
    image = sorted((Path(__file__).resolve().parents[1] / "examples").iterdir())[0]
    assert visualization.main(["gradcam", "--img-path", str(image), "--out", str(tmp_path), "--workers", "0",
                               "--memory-format", layout]) == 0
    assert seen == [MEMORY_FORMATS[layout]]


@pytest.mark.parametrize(("method", "expected"), [("gradcam", torch.channels_last), ("lrp", torch.contiguous_format)])
def test_the_default_layout_is_the_methods_own(method, expected):
    from app.setup import build_setup
    args = visualization.build_parser().parse_args([method, "--name", "resnet18", "--weights", "random",
                                                    "--device", "cpu"])
    setup = build_setup(args)
    assert memory_format_of(setup.spec.model) == expected
