"""Integrated Grad-CAM (methods/igcam.py) and CAMERAS (methods/cameras.py): closed forms against plain autograd hooks,
convergence, batching, chunking, option checks and a run through UCAG. Small inputs, resnet18."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from methods.cam import GradCAM
from methods.cameras import CAMERAS, build_cameras
from methods.igcam import IntegratedGradCAM, build_igcam
from models import load_model
from ucag import UCAG


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many small forwards: on a busy 2-core machine two intra-op threads were up to 30x slower
    (0.03 s vs 0.8 s per resnet18 forward) than one; the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning
        return load_model("resnet18", "random")


@pytest.fixture(scope="module")
def x64():
    torch.manual_seed(1)
    return torch.randn(3, 3, 64, 64)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def act_and_grad(spec, x, targets):
    """A and dS_t/dA at the CAM layer with a forward hook and plain autograd (no LayerCapture)."""
    store = {}
    handle = spec.layer.register_forward_hook(lambda module, inputs, output: store.setdefault("a", output))
    try:
        logits = spec.model(x)
        (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), grads, logits.detach()


def black(spec):
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (0 - mean) / std


# ---------------------------------------------------------------- Integrated Grad-CAM

def test_igcam_one_step_is_its_closed_form(r18, x64):
    targets = torch.tensor([3, 7, 11])
    maps, logits = build_igcam(r18, steps=1)(x64, targets)
    a_x, g_x, logits_ref = act_and_grad(r18, x64, targets)
    a_base, _, _ = act_and_grad(r18, black(r18).expand(1, 3, 64, 64), targets[:1])
    expected = (g_x.mean(dim=(2, 3), keepdim=True) * (a_x - a_base)).sum(dim=1, keepdim=True)
    assert maps.shape == (3, 1, 2, 2)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert torch.allclose(logits, logits_ref, atol=1e-5)


def test_igcam_is_the_path_average_of_baseline_relative_gradcam(r18, x64):
    x, targets, m = x64[:1], torch.tensor([5]), 3
    base = black(r18).expand(1, 3, 64, 64)
    a_base, _, _ = act_and_grad(r18, base, targets)
    expected = 0
    for k in range(1, m + 1):
        a, g, _ = act_and_grad(r18, base + k / m * (x - base), targets)
        expected = expected + (g.mean(dim=(2, 3), keepdim=True) * (a - a_base)).sum(dim=1, keepdim=True) / m
    maps, _ = build_igcam(r18, steps=m)(x, targets)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_igcam_converges_as_steps_grow(r18, x64):
    explainer = lambda m: build_igcam(r18, steps=m)  # noqa: E731
    x, targets = x64[1:2], torch.tensor([4])
    maps = {m: explainer(m)(x, targets).maps for m in (4, 8, 16, 32)}
    gaps = [float((maps[m] - maps[2 * m]).norm() / maps[2 * m].norm()) for m in (4, 8, 16)]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < gaps[0] / 2.5, gaps  # O(1/m): 4x more steps, about 4x smaller gap (here 5x)


@pytest.mark.parametrize("build,options", [(build_igcam, {"steps": 3}),
                                           (build_cameras, {"resolutions": (64, 96)})], ids=["igcam", "cameras"])
def test_batch_with_per_sample_targets_equals_single_images(build, options, r18, x64):
    explainer = build(r18, **options)
    targets = torch.tensor([1, 500, 999])
    maps, logits = explainer(x64, targets)
    for i in range(3):
        single, single_logits = explainer(x64[i:i + 1], targets[i:i + 1])
        assert torch.allclose(maps[i], single[0], rtol=1e-4, atol=1e-6 * float(single.abs().max()))
        assert torch.allclose(logits[i], single_logits[0], atol=1e-5)


@pytest.mark.parametrize("formula", ["integrated", "notebook"])
def test_igcam_path_batch_chunks_give_the_same_maps(r18, x64, formula):
    targets = torch.tensor([2, 9, 40])
    full, logits = build_igcam(r18, steps=3, formula=formula)(x64, targets)
    for path_batch in (2, 4, 100):  # 9 rows: chunks that cut across images and steps, or one chunk
        chunked, chunked_logits = build_igcam(r18, steps=3, formula=formula, path_batch=path_batch)(x64, targets)
        assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-6 * float(full.abs().max()))
        assert torch.allclose(chunked_logits, logits, atol=1e-5)


def test_igcam_targets_none_explains_the_prediction(r18, x64):
    explainer = build_igcam(r18, steps=3)
    maps, logits = explainer(x64)
    explicit, _ = explainer(x64, logits.argmax(1))
    with torch.no_grad():
        assert torch.allclose(logits, r18.model(x64), atol=1e-5)
    assert torch.allclose(maps, explicit, rtol=1e-5, atol=1e-7)


def test_igcam_notebook_formula_is_the_mean_of_relu_gradcam_on_the_path(r18, x64):
    x, targets, m = x64[:2], torch.tensor([6, 8]), 4
    base = black(r18)
    gradcam = GradCAM(r18.model, r18.layer)
    expected = sum(gradcam(base + k / m * (x - base), targets).maps.clamp(min=0) for k in range(m)) / m
    maps, logits = build_igcam(r18, steps=m, formula="notebook")(x, targets)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert float(maps.min()) >= 0


def test_igcam_baselines(r18, x64):
    x = x64[:1]
    explainer = build_igcam(r18)
    assert torch.allclose(explainer.baseline_image(x), black(r18))
    assert torch.allclose(build_igcam(r18, baseline=0.0).baseline_image(x), black(r18))
    assert torch.equal(build_igcam(r18, baseline="zeros").baseline_image(x), torch.zeros(1, 3, 1, 1))
    assert torch.allclose(build_igcam(r18, baseline=1.0).baseline_image(x),
                          (1 - torch.tensor(r18.mean)).div(torch.tensor(r18.std)).view(1, 3, 1, 1))
    black_maps = build_igcam(r18, steps=2)(x, [3]).maps
    zero_maps = build_igcam(r18, steps=2, baseline="zeros")(x, [3]).maps
    assert not torch.allclose(black_maps, zero_maps)


@pytest.mark.parametrize("options", [dict(steps=0), dict(steps=2.5), dict(steps=True), dict(path_batch=0),
                                     dict(baseline="white"), dict(baseline=float("nan")), dict(baseline=None),
                                     dict(baseline=7.0), dict(baseline=-0.5), dict(formula="paper")])
def test_igcam_rejects_bad_options(r18, options):
    with pytest.raises(ValueError):
        build_igcam(r18, **options)


# ---------------------------------------------------------------- CAMERAS

def upsampled_product(a, g, size):
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    return (up(a) * up(g)).sum(dim=1, keepdim=True)


def test_cameras_single_native_resolution_is_the_upsampled_grad_times_activation(r18, x64):
    targets = torch.tensor([10, 20, 30])
    maps, logits = build_cameras(r18, resolutions=[64])(x64, targets)
    a, g, logits_ref = act_and_grad(r18, x64, targets)
    expected = upsampled_product(a, g, (64, 64))
    assert maps.shape == (3, 1, 64, 64)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert torch.allclose(logits, logits_ref, atol=1e-5)


def test_cameras_fuses_means_over_resolutions(r18, x64):
    targets = torch.tensor([10, 20, 30])
    maps, logits = build_cameras(r18, resolutions=(64, 96, 80))(x64, targets)
    up = lambda t: F.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    mean_a = mean_g = 0
    for side in (64, 96, 80):
        z = x64 if side == 64 else F.interpolate(x64, size=(side, side), mode="bicubic", align_corners=False)
        a, g, _ = act_and_grad(r18, z, targets)
        mean_a, mean_g = mean_a + up(a) / 3, mean_g + up(g) / 3
    expected = (mean_a * mean_g).sum(dim=1, keepdim=True)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    with torch.no_grad():
        assert torch.allclose(logits, r18.model(x64), atol=1e-5)


def test_cameras_channel_chunked_fusion_is_the_same(r18, x64, monkeypatch):
    explainer = build_cameras(r18, resolutions=(64, 80))
    full, _ = explainer(x64, [1, 2, 3])
    monkeypatch.setattr(CAMERAS, "fusion_elements", 3 * 64 * 64 * 7)  # 7 channels per chunk
    chunked, _ = explainer(x64, [1, 2, 3])
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-6 * float(full.abs().max()))


def test_cameras_without_native_first_resizes_every_pass(r18, x64):
    targets = torch.tensor([10, 20, 30])
    maps, logits = build_cameras(r18, resolutions=[96], native_first=False)(x64, targets)
    a, g, _ = act_and_grad(r18, F.interpolate(x64, size=(96, 96), mode="bicubic", align_corners=False), targets)
    expected = upsampled_product(a, g, (64, 64))
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    with torch.no_grad():
        assert torch.allclose(logits, r18.model(x64), atol=1e-5)  # the logits of x, not of the 96 pass


def test_cameras_targets_none_keeps_the_resolutions_that_agree(r18, x64):
    """As the official code: without a class, resolutions whose top-1 differs from x's are left out."""
    resolutions = (64, 80, 96, 112)
    maps, logits = build_cameras(r18, resolutions=resolutions)(x64)
    predicted = logits.argmax(1)
    saw_disagreement = False
    for i in range(3):
        keep = [64]
        for side in resolutions[1:]:
            with torch.no_grad():
                z = F.interpolate(x64[i:i + 1], size=(side, side), mode="bicubic", align_corners=False)
                if int(r18.model(z).argmax(1)) == int(predicted[i]):
                    keep.append(side)
        saw_disagreement |= len(keep) < len(resolutions)
        expected, _ = build_cameras(r18, resolutions=keep)(x64[i:i + 1], predicted[i:i + 1])
        assert torch.allclose(maps[i], expected[0], rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert saw_disagreement  # the random model changes its mind across sizes: the filter was exercised


def test_cameras_non_square_inputs_keep_their_aspect(r18):
    assert CAMERAS.pass_size(64, 64, 224) == (224, 224)
    assert CAMERAS.pass_size(64, 96, 128) == (128, 192)
    assert CAMERAS.pass_size(100, 50, 100) == (200, 100)
    x = torch.randn(2, 3, 64, 96)
    maps, logits = build_cameras(r18, resolutions=(64, 96))(x, [1, 2])
    assert maps.shape == (2, 1, 64, 96) and bool(torch.isfinite(maps).all())


def test_cameras_default_resolutions_are_the_official_ones(r18):
    assert build_cameras(r18).resolutions == (224, 324, 424, 524, 624, 724, 824, 924)


@pytest.mark.parametrize("options", [dict(resolutions=[]), dict(resolutions=[64, 0]), dict(resolutions=[64.0]),
                                     dict(resolutions="224"), dict(resolutions=5), dict(resolutions=[True]),
                                     dict(resolutions=[16]), dict(native_first="yes")])
def test_cameras_rejects_bad_options(r18, options):
    with pytest.raises(ValueError):
        build_cameras(r18, **options)


# ---------------------------------------------------------------- both

@pytest.mark.parametrize("build", [lambda spec: build_igcam(spec, steps=4),
                                   lambda spec: build_igcam(spec, steps=3, path_batch=5),
                                   lambda spec: build_cameras(spec, resolutions=(64, 96))])
def test_through_ucag(r18, build):
    torch.manual_seed(2)
    maps, logits = UCAG(build(r18), crop=150, n=2, alpha=1.2)(torch.randn(2, 3, 64, 64), [1, 2])
    assert maps.shape == (2, 1, 64, 64)
    assert bool(torch.isfinite(maps).all()) and float(maps.abs().max()) > 0
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("build", [lambda spec: build_igcam(spec, steps=2),
                                   lambda spec: build_cameras(spec, resolutions=(64, 96))])
def test_model_state_and_hooks_restored_and_no_grad_callers_served(r18, x64, build):
    model = r18.model
    before = hook_count(model)
    model.train()
    explainer = build(r18)
    try:
        with torch.no_grad():  # callers may be inside no_grad: the gradients are still taken
            maps, logits = explainer(x64[:1], [3])
            assert not torch.is_grad_enabled()
        still_training = all(m.training for m in model.modules())
    finally:
        model.eval()
    assert still_training and hook_count(model) == before
    assert all(p.requires_grad for p in model.parameters())
    assert bool(torch.isfinite(maps).all()) and float(maps.abs().max()) > 0 and not logits.requires_grad
    assert torch.is_grad_enabled()


def test_repr_and_names(r18):
    assert IntegratedGradCAM.name == "igcam" and CAMERAS.name == "cameras"
    assert "steps=50" in repr(build_igcam(r18)) and "924" in repr(build_cameras(r18))
