"""Score-CAM and RISE: batched chunks equal one-at-a-time references, masks, targets, UCAG, options."""
from collections import OrderedDict

import pytest
import skimage.transform as skimage_transform
import torch
import torch.nn.functional as F

from methods.perturbation import RISE, ScoreCAM, build_rise, build_scorecam, mirror_interpolation
from models.spec import ModelSpec
from ucag import UCAG


def tiny_spec(multilabel=False, target_layer="act") -> ModelSpec:
    """A small CNN whose layer 'act' has 6 channels: one always zero, one constant 0.5; 'conv2' is
    followed by an in-place ReLU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict([
        ("conv1", torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)),
        ("bn", torch.nn.BatchNorm2d(8)),
        ("relu1", torch.nn.ReLU(inplace=True)),
        ("conv2", torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)),
        ("act", torch.nn.ReLU(inplace=True)),
        ("conv3", torch.nn.Conv2d(6, 6, 1)),
        ("relu3", torch.nn.ReLU(inplace=True)),
        ("pool", torch.nn.AdaptiveAvgPool2d(1)),
        ("flat", torch.nn.Flatten()),
        ("fc", torch.nn.Linear(6, 10)),
    ]))
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.conv2.bias[0] = -100.0  # dead channel: all zero
        model.conv2.weight[1] = 0.0
        model.conv2.bias[1] = 0.5     # constant non-zero channel
    model.eval()
    return ModelSpec(name="tiny", model=model, target_layer=target_layer, categories=[str(i) for i in range(10)],
                     multilabel=multilabel)


def scorecam_reference(spec, x, targets):
    """Official Score-CAM, one image and one channel at a time."""
    model = spec.model
    depth = list(model._modules).index(spec.target_layer) + 1
    maps = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            image = x[b:b + 1]
            activation = model[:depth](image)[0].clone()
            saliency = torch.zeros(activation.shape[1:])
            for c in range(activation.shape[0]):
                if activation[c].max() == activation[c].min():
                    continue
                up = F.interpolate(activation[c][None, None], size=x.shape[-2:], mode="bilinear",
                                   align_corners=False)
                mask = (up - up.min()) / (up.max() - up.min())
                probs = model(image * mask)
                probs = torch.sigmoid(probs) if spec.multilabel else torch.softmax(probs, dim=1)
                saliency += probs[0, targets[b]] * activation[c]
            maps.append(saliency)
    return torch.stack(maps)[:, None]


def rise_reference(explainer, x, targets):
    """RISE with the explainer's masks, one mask at a time."""
    masks = explainer.masks(*x.shape[-2:])
    maps = torch.zeros(x.shape[0], 1, *x.shape[-2:])
    with torch.no_grad():
        for b in range(x.shape[0]):
            for mask in masks:
                logits = explainer.model(x[b:b + 1] * mask)
                probs = torch.sigmoid(logits) if explainer.multilabel else torch.softmax(logits, dim=1)
                maps[b, 0] += probs[0, targets[b]] * mask
    return maps / (explainer.n_masks * explainer.p)


@pytest.mark.parametrize("layer", ["act", "conv2"])  # conv2: signed A, an in-place ReLU runs after it
@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("mask_batch", [1, 7, 1000])  # 7 divides neither B*C = 18 nor the 12 scored pairs
def test_scorecam_equals_one_channel_at_a_time(mask_batch, multilabel, layer):
    spec = tiny_spec(multilabel, layer)
    x = torch.randn(3, 3, 40, 36)
    targets = torch.tensor([3, 0, 7])
    maps, logits = build_scorecam(spec, mask_batch=mask_batch)(x, targets)
    expected = scorecam_reference(spec, x, targets)
    assert maps.shape == (3, 1, 10, 9)
    assert torch.allclose(maps, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(logits, spec.model(x), atol=1e-6)
    assert not logits.requires_grad


def test_scorecam_skips_constant_channels():
    spec = tiny_spec()
    x = torch.randn(1, 3, 32, 32)
    scorecam = ScoreCAM(spec.model, spec.layer, mask_batch=100)
    scorecam.num_classes(x)  # the class count K for the range check: one forward, once per explainer
    calls = []
    handle = spec.model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    try:
        scorecam(x, [2])
    finally:
        handle.remove()
    assert calls == [1, 4]  # the image, then only its 4 non-constant channels


@pytest.mark.parametrize("multilabel", [False, True])
def test_rise_equals_one_mask_at_a_time(multilabel):
    spec = tiny_spec(multilabel)
    x = torch.randn(2, 3, 30, 26)
    targets = torch.tensor([1, 8])
    expected = None
    for mask_batch in [7, 1, 64]:  # 7 divides neither N = 12 nor B*N = 24; 64 exceeds both
        explainer = build_rise(spec, n_masks=12, cell=5, p=0.4, seed=3, mask_batch=mask_batch)
        maps, logits = explainer(x, targets)
        if expected is None:
            expected = rise_reference(explainer, x, targets)
        assert maps.shape == (2, 1, 30, 26)
        assert torch.allclose(maps, expected, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        assert torch.allclose(logits, spec.model(x), atol=1e-6)


def test_rise_masks_are_seeded_bounded_and_keep_p():
    height, width = 50, 37
    masks = RISE(torch.nn.Identity(), n_masks=300, cell=6, p=0.3, seed=1).masks(height, width)
    assert masks.shape == (300, height, width)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(float(masks.mean()) - 0.3) < 0.03
    assert torch.equal(masks, RISE(torch.nn.Identity(), n_masks=300, cell=6, p=0.3, seed=1).masks(height, width))
    assert not torch.equal(masks, RISE(torch.nn.Identity(), n_masks=300, cell=6, p=0.3, seed=2).masks(height, width))


def test_rise_masks_follow_the_official_construction():
    """Grid upsampled to (s+1)*ceil(H/s) (skimage's linear resize, mirror boundary), shifted crop."""
    explainer = RISE(torch.nn.Identity(), n_masks=5, cell=4, p=0.5, seed=0)
    height, width = 30, 21
    masks = explainer.masks(height, width)
    grids, shift_h, shift_w, _, _ = explainer._factors(height, width, "cpu")
    up_size = (5 * 8, 5 * 6)  # (s + 1) * ceil(H / s), (s + 1) * ceil(W / s)
    for i in range(5):
        assert 0 <= shift_h[i] < 8 and 0 <= shift_w[i] < 6
        full = skimage_transform.resize(grids[i].double().numpy(), up_size, order=1, mode="reflect",
                                        anti_aliasing=False)
        crop = full[shift_h[i]:shift_h[i] + height, shift_w[i]:shift_w[i] + width]
        assert torch.allclose(masks[i].double(), torch.from_numpy(crop), atol=1e-6)
    # away from the border it is plain bilinear upsampling
    grid = torch.rand(1, 1, 7, 7)
    upsampled = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    matrix = mirror_interpolation(7, 64)
    assert torch.allclose((matrix @ grid[0, 0] @ matrix.T)[5:-5, 5:-5], upsampled[5:-5, 5:-5], atol=1e-6)


def test_rise_caches_masks_per_size():
    explainer = RISE(torch.nn.Identity(), n_masks=4)
    first = explainer._factors(20, 20, "cpu")
    assert explainer._factors(20, 20, torch.device("cpu")) is first
    assert explainer._factors(20, 24, "cpu") is not first


@pytest.mark.parametrize("name", ["scorecam", "rise"])
def test_per_sample_targets_equal_single_image_runs(name):
    spec, x, targets = tiny_spec(), torch.randn(3, 3, 32, 32), torch.tensor([4, 9, 0])
    explainer = build_scorecam(spec, mask_batch=5) if name == "scorecam" else build_rise(spec, n_masks=8, mask_batch=7)
    maps, logits = explainer(x, targets)
    for i in range(3):
        single_maps, single_logits = explainer(x[i:i + 1], targets[i:i + 1])
        assert torch.allclose(maps[i], single_maps[0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(logits[i], single_logits[0], rtol=1e-4, atol=1e-5)
    maps_pred, _ = explainer(x)  # no targets: the prediction
    assert torch.allclose(maps_pred, explainer(x, logits.argmax(1)).maps)


@pytest.mark.parametrize("name", ["scorecam", "rise"])
def test_runs_through_ucag(name, lite):
    """Score-CAM on the tiny CNN (Lite0 has 1280 channels), RISE on Lite0 with its real weights."""
    explainer = build_scorecam(tiny_spec()) if name == "scorecam" else build_rise(lite, n_masks=20)
    maps, logits = UCAG(explainer, crop=150, n=2, alpha=1.2)(torch.randn(2, 3, 64, 64), [1, 2])
    assert maps.shape == (2, 1, 64, 64)
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_model_state_restored():
    spec = tiny_spec()
    spec.model.train()
    spec.model.fc.weight.requires_grad_(False)
    build_scorecam(spec)(torch.randn(1, 3, 16, 16))
    RISE(spec.model, n_masks=3)(torch.randn(1, 3, 16, 16))
    assert all(m.training for m in spec.model.modules())
    assert not spec.model.fc.weight.requires_grad
    assert all(len(m._forward_hooks) == 0 for m in spec.model.modules())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("options", [
    {"mask_batch": 0}, {"mask_batch": -3}, {"mask_batch": 2.5}, {"mask_batch": "8"}, {"mask_batch": True},
])
def test_scorecam_bad_options_raise(options):
    spec = tiny_spec()
    with pytest.raises(ValueError, match="mask_batch"):
        build_scorecam(spec, **options)


@pytest.mark.parametrize("options", [
    {"n_masks": 0}, {"n_masks": 10.0}, {"cell": 0}, {"cell": -1}, {"p": 0}, {"p": 1.5}, {"p": -0.1},
    {"p": "0.5"}, {"seed": 1.5}, {"seed": None}, {"mask_batch": 0},
])
def test_rise_bad_options_raise(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        build_rise(tiny_spec(), **options)
