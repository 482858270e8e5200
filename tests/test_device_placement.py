"""Every tensor a method, UCAG or a metric creates is created on the input's device.

Each case runs twice with its model and inputs on the ``--device`` (cpu by default; ``--device cuda`` on a
GPU): once as usual and once with the default device set to "meta". A factory call that leaves out ``device=``
(``torch.zeros``, ``arange``, ``tensor``, ``rand`` with a CPU generator, ...) then makes a meta tensor:
the first op that mixes it with the device's data fails, a copy out of it fails, or the result comes back on
meta. Both runs must give the same numbers (exactly on a CPU; on CUDA within float rounding, as a few kernels
have no deterministic version), so the meta default changes nothing but where a stray tensor would land: on
a GPU run, the CPU.

Models and inputs are made before the meta default is set (a model built under it would be meta itself);
explainers are built inside each run, so builders are checked too and caches (RISE's masks) start empty.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.vgg import VGG, make_layers

from evaluation.datasets import Sample
from evaluation.image_metric import ImageMetricTask
from evaluation.insertion_deletion import auc, game_curves, insertion_substrate
from evaluation.map_density import map_density
from evaluation.pointing import energy_score, explainer_point, map_point, pointing_hit
from evaluation.reports import write_density_report
from evaluation.rows import Row
from evaluation.segmentation_metrics import average_precision, image_scores, pixel_counts, threshold_maps
from methods import available_methods, build_explainer, finalize_maps, finalize_signed
from methods.base import Explainer, Explanation
from methods.baselines import Center
from methods.transformer import METHODS as TRANSFORMER_METHODS
from models import load_model, preprocess
from models.preprocessing import preprocess_one
from models.spec import ModelSpec
from tests.vit_fixtures import tiny_vit_spec
from ucag import UCAG, UpscaledInput

RELEVANCE = ("agf", "clrp", "lrp", "rap", "rsp", "sglrp")
MASK_SCORING = ("adasise", "scorecam", "sise")  # one forward per mask: run on resnet18 only, on small layers

# cheap settings; every chunked loop still runs more than one chunk
FAST = {"rise": {"n_masks": 6, "mask_batch": 4}, "scorecam": {"mask_batch": 24},
        "cameras": {"resolutions": (64, 80)}, "igcam": {"steps": 3, "path_batch": 2},
        "sise": {"mask_batch": 24}, "adasise": {"mask_batch": 24},
        "extremal": {"max_iter": 3, "jitter": "random"}}
RESNET_LAYERS = {"sise": {"layers": ("relu", "layer1")}, "adasise": {"layers": ("relu", "layer1")}}
RESNET_TARGET_LAYER = {"scorecam": "layer1"}  # 64 masks instead of layer4's 512

EXTRA = [("lrp", {"rule": "epsilon"}), ("lrp", {"rule": "alpha2beta1"}), ("igcam", {"baseline": "zeros"})]
CNN_METHODS = [m for m in available_methods() if m not in TRANSFORMER_METHODS]  # the others need a ViT
RESNET_CASES = [(m, {}) for m in CNN_METHODS] + EXTRA
VGG_CASES = [(m, {}) for m in RELEVANCE]
LITE_CASES = [(m, {}) for m in CNN_METHODS if m not in RELEVANCE + MASK_SCORING]
VIT_CASES = [(m, {}) for m in TRANSFORMER_METHODS] + [("rollout", {"head_fusion": "max", "discard_ratio": 0.5})]


def case_id(case) -> str:
    method, options = case
    return method + "".join(f"-{value}" for value in options.values())


# ---- harness ----------------------------------------------------------------------------------------------

def assert_same(got, expected, where: str = "result") -> None:
    """``got`` (run under the meta default) equals ``expected`` (exactly on a CPU), each tensor on the device
    of the usual run's."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__} instead of a tensor"
        assert got.device == expected.device, f"{where} is on {got.device}, not on {expected.device}"
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if expected.is_cuda else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(got, expected, **tolerance, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(got, float) and math.isnan(got), f"{where}: {got} instead of NaN"
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def _on_meta(result) -> bool:
    if isinstance(result, torch.Tensor):
        return result.is_meta
    if isinstance(result, dict):
        return any(_on_meta(value) for value in result.values())
    return isinstance(result, (list, tuple)) and any(_on_meta(value) for value in result)


def same_under_meta_default(run):
    """``run()`` as usual and with the default device "meta"; the two results must agree (see above)."""
    expected = run()
    assert not _on_meta(expected), "the usual run made meta tensors"
    with torch.device("meta"):
        got = run()
    assert torch.empty(0).device == torch.device("cpu")  # the default is back
    assert_same(got, expected)
    return got


# ---- fixtures ---------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18(device) -> ModelSpec:
    torch.manual_seed(0)
    return load_model("resnet18", "random", device)


@pytest.fixture(scope="module")
def lite0(device) -> ModelSpec:
    return load_model("efficientnet_lite0", "default", device)


@pytest.fixture(scope="module")
def tiny_vgg(device) -> ModelSpec:
    """A narrow torchvision VGG (VGG11's layout at 1/8 width, a small classifier with its ReLU and Dropout
    steps): the relevance methods' VGG path without VGG11's 100M-weight classifier."""
    torch.manual_seed(0)
    model = VGG(make_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M"]), num_classes=10, init_weights=False)
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.classifier = nn.Sequential(nn.Linear(256, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    return ModelSpec("tiny_vgg", model.eval().to(device), "features.14", [str(i) for i in range(10)])


@pytest.fixture(scope="module")
def tiny_vit(device) -> ModelSpec:
    """A 2-block ViT taking any input size: the transformer methods' model."""
    spec = tiny_vit_spec()
    spec.model.to(device)
    return spec


@pytest.fixture(scope="module")
def image(device):
    """image(size, seed=1): a (1, 3, size, size) normal batch on the device (drawn on the CPU: the same numbers
    on every device)."""
    def make(size: int, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(1, 3, size, size, generator=generator, device="cpu").to(device)
    return make


def explain(spec: ModelSpec, method: str, options: dict, x: torch.Tensor, targets, layers: dict | None = None,
            target_layer: dict | None = None):
    if target_layer and method in target_layer:
        spec = dataclasses.replace(spec, target_layer=target_layer[method], activation_post=None)
    options = {**FAST.get(method, {}), **(layers or {}).get(method, {}), **options}

    def run():
        return tuple(build_explainer(method, spec, **options)(x, targets))
    return run


# ---- every explainer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", RESNET_CASES, ids=case_id)
def test_method_on_resnet18(case, resnet18, image):
    method, options = case
    maps, logits = same_under_meta_default(explain(resnet18, method, options, image(64), [3], RESNET_LAYERS,
                                                   RESNET_TARGET_LAYER))
    assert maps.shape[:2] == (1, 1) and logits.shape == (1, 1000)


@pytest.mark.parametrize("case", VGG_CASES, ids=case_id)
def test_relevance_method_on_vgg(case, tiny_vgg, image):
    method, options = case
    same_under_meta_default(explain(tiny_vgg, method, options, image(32), [3]))


@pytest.mark.parametrize("case", LITE_CASES, ids=case_id)
def test_method_on_efficientnet_lite0_explaining_the_prediction(case, lite0, image):
    method, options = case
    same_under_meta_default(explain(lite0, method, options, image(64), None))


@pytest.mark.parametrize("case", VIT_CASES, ids=case_id)
@pytest.mark.parametrize("targets", [[3], None], ids=["target", "prediction"])
def test_transformer_method_on_a_tiny_vit(case, targets, tiny_vit, image):
    method, options = case
    maps, logits = same_under_meta_default(explain(tiny_vit, method, options, image(64), targets))
    assert maps.shape[:2] == (1, 1) and logits.shape == (1, tiny_vit.num_classes)


@pytest.mark.parametrize("method", available_methods())
def test_method_through_ucag(method, resnet18, image, request):
    """n=2 at alpha 1.2: 4 crops, explained 2 per chunk; UCAG resolves the targets (the prediction)."""
    spec = request.getfixturevalue("tiny_vit") if method in TRANSFORMER_METHODS else resnet18
    if method in RESNET_TARGET_LAYER:
        spec = dataclasses.replace(spec, target_layer=RESNET_TARGET_LAYER[method], activation_post=None)
    options = {**FAST.get(method, {}), **RESNET_LAYERS.get(method, {})}
    x = image(64)

    def run():
        explainer = UCAG(build_explainer(method, spec, **options), crop=150, n=2, alpha=1.2, patch_batch=2)
        maps, logits = explainer(x)
        return maps, logits, explainer.finalize(maps, (48, 48))
    same_under_meta_default(run)


def test_ucag_official_mode_upscaled_baseline_and_final_maps(resnet18, image):
    x = image(64)

    def run():
        gradcam = build_explainer("gradcam", resnet18)
        official = UCAG(gradcam, crop=150, n=3, alpha=1.2, patch_batch=4, official=True)
        raw, _ = official(x, [5])
        upscaled = UpscaledInput(build_explainer("lrp", resnet18), alpha=1.3)
        signed, _ = upscaled(x, 5)
        return (official.finalize(raw), official.finalize(raw, (40, 40)), official.finalize_signed(raw, (40, 40)),
                upscaled.finalize_signed(signed, (64, 64)), finalize_maps(raw, (80, 80)), finalize_signed(raw))
    same_under_meta_default(run)


# ---- every metric -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(lite0, image):
    """Two 64 px images, their final Grad-CAM maps and target classes (made outside the meta default)."""
    x = torch.cat([image(64, 1), image(64, 2)])
    explainer = build_explainer("gradcam", lite0)
    raw, logits = explainer(x)
    return x, explainer.finalize(raw, (64, 64)), logits.argmax(1)


def test_insertion_and_deletion_games(lite0, scored):
    x, maps, targets = scored

    def run():
        curves = {mode: game_curves(lite0.model, x, maps, targets, mode, step=512, forward_batch=4)
                  for mode in ("deletion", "insertion")}
        return curves, {mode: auc(c) for mode, c in curves.items()}, insertion_substrate(x)
    curves, _, _ = same_under_meta_default(run)
    assert curves["deletion"].shape == (2, 9)


def test_map_density(lite0, scored):
    x, maps, targets = scored
    flat = torch.zeros_like(maps)  # sum(M) = 0: NaN density

    def run():
        return map_density(lite0.model, x, maps, targets), map_density(lite0.model, x, flat, targets)
    same_under_meta_default(run)


def test_pointing_and_energy_games(scored):
    _, maps, _ = scored
    saliency = maps[0, 0]
    mask = np.zeros((64, 64), bool)
    mask[10:30, 20:50] = True
    boxes = np.zeros((64, 64), bool)
    boxes[5:40, 5:60] = True

    def run():
        point = map_point(saliency)
        return (point, explainer_point(Center(nn.Identity()), saliency), explainer_point(object(), saliency),
                pointing_hit(mask, point), pointing_hit(torch.from_numpy(mask), (20.5, 35.0)),
                pointing_hit(torch.from_numpy(mask).to(saliency.device), (20.5, 35.0)),
                pointing_hit(mask, (60.0, 2.0)), energy_score(saliency, boxes),
                energy_score(saliency, torch.from_numpy(boxes)), energy_score(saliency, torch.from_numpy(boxes).to(
                    saliency.device)))
    same_under_meta_default(run)


def test_segmentation_metrics(scored):
    _, maps, _ = scored
    maps = maps[:, 0]
    truth = torch.zeros(2, 64, 64, dtype=torch.long, device=maps.device)
    truth[:, 16:48, 8:40] = 1
    truth[1, :4] = -1  # unlabelled rows
    signed = maps * 2 - 1

    def run():
        foreground = threshold_maps(maps, signed=False)
        return (foreground, threshold_maps(signed, signed=True), pixel_counts(foreground, truth),
                average_precision(maps[0], truth[0] > 0), average_precision(maps[0], torch.zeros_like(truth[0])),
                image_scores(maps, truth, signed=False, protocol="map"),
                image_scores(signed, truth, signed=True, protocol="agf"))
    same_under_meta_default(run)


def test_preprocessing_and_the_evaluation_driver(lite0, device):
    photos = [np.random.default_rng(seed).integers(0, 256, (50 + 10 * seed, 70, 3), dtype=np.uint8) for seed in (1, 2)]
    spec = dataclasses.replace(lite0, input_size=(64, 64))
    batch = [{"key": f"img{i}", "sample": Sample(Path(f"img{i}.png"), f"img{i}", label), "image": photo}
             for i, (photo, label) in enumerate(zip(photos, (3, 7), strict=True))]

    def density(model, images, maps, targets):
        positive, negative = map_density(model, images, maps, targets)
        return {"positive": positive, "negative": negative}

    def run():
        rows = [Row("gradcam", build_explainer("gradcam", spec)),
                Row("gradcam*", UCAG(build_explainer("gradcam", spec), crop=150, n=2, alpha=1.2), ucag=True)]
        records = {mode: ImageMetricTask([], spec, device, rows, density, ("positive", "negative"),
                                         mode, report=write_density_report).process(batch) for mode in ("gt", "pred")}
        return preprocess(photos, spec, device), preprocess_one(photos[0], spec, device), records
    *_, records = same_under_meta_default(run)
    assert [r["target"] for r in records["gt"]] == [3, 7]


# ---- the check itself -------------------------------------------------------------------------------------

class StrayZeros(Explainer):
    """Grad-CAM plus a tensor made without ``device=``: as a term of the map, or as the map itself."""

    def __init__(self, spec: ModelSpec, as_result: bool):
        super().__init__(spec.model)
        self.gradcam, self.as_result = build_explainer("gradcam", spec), as_result

    def explain(self, x, targets):
        maps, logits = self.gradcam.explain(x, targets)
        if self.as_result:
            return Explanation(torch.zeros(maps.shape), logits)
        return Explanation(maps + torch.zeros(1, 1, 1, 1), logits)


@pytest.mark.parametrize("as_result", [False, True], ids=["mixed-op", "returned"])
def test_the_check_catches_a_factory_call_without_device(as_result, resnet18, image):
    x = image(64)
    with pytest.raises((AssertionError, RuntimeError, NotImplementedError)):
        same_under_meta_default(lambda: tuple(StrayZeros(resnet18, as_result)(x, [3])))
