"""Extremal perturbations (methods/extremal.py) against TorchRay 1.0.0.2's ``extremal_perturbation``, its pieces
(mask generator, blur pyramid), batching, seeds and option checks."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision

import methods.extremal as extremal
from methods import build_explainer
from methods.errors import MethodError
from methods.extremal import ExtremalPerturbation, SmoothMaskGenerator, blur_pyramid, perturb
from models import load_model

torchray_ep = pytest.importorskip("torchray.attribution.extremal_perturbation")
AREAS = [0.025, 0.05, 0.1, 0.2]


def torchray_maps(model, x, targets, max_iter, smooth=0.09):
    """TorchRay's benchmark call, one image at a time, its masks summed over the areas (a copy of the model:
    TorchRay switches off requires_grad of the parameters and leaves them so)."""
    maps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.meshgrid's indexing warning inside TorchRay
        for image, target in zip(x, targets, strict=True):
            masks, _ = torchray_ep.extremal_perturbation(
                copy.deepcopy(model), image[None], target, areas=AREAS, num_levels=8, step=7, sigma=21,
                max_iter=max_iter, jitter=True, smooth=smooth, resize=True, perturbation="blur",
                reward_func=torchray_ep.simple_reward, variant=torchray_ep.PRESERVE_VARIANT)
            maps.append(masks.sum(dim=0, keepdim=True))
    return torch.cat(maps)


@pytest.fixture(scope="module")
def paper_models():
    """Random VGG16 and ResNet50 (seeded), as the paper's Table 2 networks."""
    models = {}
    for name in ("vgg16", "resnet50"):
        torch.manual_seed(0)
        models[name] = getattr(torchvision.models, name)(weights=None).eval()
    return models


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator(device="cpu").manual_seed(1))


@pytest.mark.parametrize("size,step,sigma", [((64, 64), 7, 21.0), ((224, 224), 7, 21.0), ((80, 96), 4, 12.0)])
def test_mask_generator_is_torchrays_bit_for_bit(size, step, sigma):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torchray_ep.MaskGenerator(size, step, sigma)
    ours = SmoothMaskGenerator(*size, step, sigma, torch.device("cpu"))
    assert list(ours.shape_in) == theirs.shape_in and list(ours.shape_out) == theirs.shape_out
    params = torch.rand(3, 1, *ours.shape_in, generator=torch.Generator(device="cpu").manual_seed(0))
    params[0] = 1  # the initial mask: many equal values
    for got, expected in zip(ours(params), theirs.generate(params), strict=True):
        assert torch.equal(got, expected)


def test_pyramid_and_perturbation_are_torchrays(images):
    pyramid = blur_pyramid(images, 8)
    masks = torch.rand(2 * 3, 1, 64, 64, generator=torch.Generator(device="cpu").manual_seed(2))
    masks[0] = 1
    perturbed = perturb(pyramid, masks)
    for i in range(2):
        theirs = torchray_ep.Perturbation(images[i:i + 1], num_levels=8)
        # the blur taps: float64 here, float32 with an epsilon in TorchRay (1e-7 apart)
        torch.testing.assert_close(pyramid[i], theirs.pyramid, rtol=0, atol=1e-6)
        torch.testing.assert_close(perturbed[3 * i:3 * i + 3], theirs.apply(masks[3 * i:3 * i + 3]), rtol=0, atol=1e-6)
    assert torch.equal(pyramid[:, -1], images) and torch.equal(perturbed[0], images[0])


@pytest.mark.slow  # 10-30 s each on two shared CPU cores
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_equals_torchray_with_its_tie_order_and_pyramid(name, paper_models, images, monkeypatch):
    """With TorchRay's own blur pyramid and its (unstable) sort order, two updates agree to float rounding.

    The initial mask has thousands of exactly equal pixels, and the area constraint's sort decides which of
    them meet a 0 of the reference vector: the tie order is part of the result, so STABLE_SORT is switched
    off here to take torch.sort's default order as TorchRay does."""
    monkeypatch.setattr(extremal, "STABLE_SORT", False)
    monkeypatch.setattr(extremal, "blur_pyramid", lambda x, levels: torch.stack(
        [torchray_ep.Perturbation(x[i:i + 1], num_levels=levels).pyramid for i in range(len(x))]))
    model = paper_models[name]
    ours = ExtremalPerturbation(model, areas=AREAS, max_iter=3)(images[1:], [7]).maps
    torch.testing.assert_close(ours, torchray_maps(model, images[1:], [7], 3), rtol=0, atol=1e-5)


@pytest.mark.slow  # 10-30 s each on two shared CPU cores
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_equals_torchray_to_the_tolerance_the_optimisation_allows(name, paper_models, images, monkeypatch):
    """Our own pyramid (taps 1e-7 from TorchRay's) and a summation order of the mask gradient that differs
    from TorchRay's nearest-upsampling backward in the last bit: the sorted area constraint turns such a
    rounding difference into a jump whenever two nearly equal pixels swap ranks at the reference's 0/1
    boundary (a pixel's constraint gradient changes by 2 lambda / N there), so the maps drift apart by
    about 1e-5 per iteration on these random networks: 1e-3 of the map's scale after 4 iterations."""
    monkeypatch.setattr(extremal, "STABLE_SORT", False)
    model = paper_models[name]
    ours = ExtremalPerturbation(model, areas=AREAS, max_iter=4)(images[:1], [3]).maps
    theirs = torchray_maps(model, images[:1], [3], 4)
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()


def test_defaults_are_torchrays_benchmark_call():
    explainer = ExtremalPerturbation(torch.nn.Linear(1, 1))
    assert (explainer.areas, explainer.max_iter, explainer.step, explainer.sigma, explainer.num_levels,
            explainer.smooth, explainer.jitter) == (tuple(AREAS), 800, 7, 21.0, 8, 0.09, "alternate")
    assert explainer.flips()[:4] == [True, False, True, False]  # TorchRay flips every even iteration


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return load_model("resnet18", "random")


def test_a_batch_equals_its_images_alone(resnet18, images):
    explainer = build_explainer("extremal", resnet18, max_iter=4, areas=[0.05, 0.2])
    maps, logits = explainer(images, [3, 7])
    assert maps.shape == (2, 1, 64, 64) and logits.shape == (2, 1000)
    for i, target in enumerate((3, 7)):
        alone, _ = explainer(images[i:i + 1], [target])
        torch.testing.assert_close(maps[i], alone[0], rtol=0, atol=1e-5)


def test_a_seed_fixes_the_random_jitter(resnet18, images):
    def run(seed):
        return build_explainer("extremal", resnet18, max_iter=4, jitter="random", seed=seed)(images[:1], [3]).maps
    assert torch.equal(run(5), run(5))
    flips = {seed: ExtremalPerturbation(resnet18.model, max_iter=40, jitter="random", seed=seed).flips()
             for seed in (0, 1)}
    assert flips[0] != flips[1] and 5 < sum(flips[0]) < 35
    assert ExtremalPerturbation(resnet18.model, max_iter=5, jitter="off").flips() == [False] * 5


def test_the_mask_follows_the_target(resnet18, images):
    """Different targets give different masks (the reward is the target's logit); the map is the sum of
    masks in [0, 1], one per area."""
    explainer = build_explainer("extremal", resnet18, max_iter=6, smooth=0.0)
    maps, _ = explainer(images[:1].expand(2, -1, -1, -1), [3, 500])
    assert not torch.allclose(maps[0], maps[1])
    assert maps.min() >= 0 and maps.max() <= len(AREAS)


def test_the_model_is_left_as_it_was(resnet18, images):
    resnet18.model.train()
    build_explainer("extremal", resnet18, max_iter=2)(images[:1], [3])
    assert resnet18.model.training and all(p.requires_grad and p.grad is None for p in resnet18.model.parameters())
    resnet18.model.eval()


@pytest.mark.parametrize("options,message", [
    ({"areas": [0.1, 1.0]}, "extremal: areas must be in (0, 1), got 1.0"),
    ({"areas": []}, "extremal: areas must be a non-empty sequence of numbers in (0, 1)"),
    ({"areas": 0.1}, "extremal: areas must be a non-empty sequence of numbers in (0, 1), got 0.1"),
    ({"max_iter": 0}, "extremal: max_iter must be a positive integer, got 0"),
    ({"step": 2.5}, "extremal: step must be a positive integer, got 2.5"),
    ({"sigma": 0}, "extremal: sigma must be a positive number, got 0"),
    ({"num_levels": 1}, "extremal: num_levels must be an integer >= 2, got 1"),
    ({"smooth": -0.1}, "extremal: smooth must be a non-negative number, got -0.1"),
    ({"jitter": "sometimes"}, "extremal: jitter must be one of alternate, random, off, got 'sometimes'"),
    ({"seed": 1.5}, "extremal: seed must be an integer, got 1.5"),
])
def test_bad_options_are_refused_in_one_line(options, message, resnet18):
    with pytest.raises(MethodError) as caught:
        build_explainer("extremal", resnet18, **options)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)
