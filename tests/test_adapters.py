"""Outside explainers (methods/adapters.py): a plain callable behind one check, Captum attribution classes by
name (captum:<ClassName>), and UCAG over them against a crop-by-crop recomputation written out here."""
import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Saliency

import visualization
from app.lifecycle import run_cli
from methods import build_explainer, canonical_name
from methods.adapters import CallableExplainer
from methods.errors import MethodError
from tests.conftest import EXAMPLES
from ucag import UCAG
from ucag.errors import UCAGError
from ucag.geometry import CropGrid
from ucag.upscaling import UpscaledCrops

TARGETS = [281, 967]


@pytest.fixture(scope="module")
def two(photo_batch):
    return photo_batch[:2]


def test_captum_layer_gradcam_is_our_gradcam(lite, two):
    ours = build_explainer("gradcam", lite)(two, TARGETS).maps
    peer = build_explainer("captum:LayerGradCam", lite)(two, TARGETS).maps
    torch.testing.assert_close(peer, ours, rtol=1e-5, atol=1e-6)
    ucag_ours = UCAG(build_explainer("gradcam", lite), crop=180, n=2, alpha=1.0)(two, TARGETS).maps
    ucag_peer = UCAG(build_explainer("captum:LayerGradCam", lite), crop=180, n=2, alpha=1.0)(two, TARGETS).maps
    torch.testing.assert_close(ucag_peer, ucag_ours, rtol=1e-5, atol=1e-6)


def crop_by_crop(model, x, targets, attribute, crop, n, alpha):
    """UCAG written out for one attribution function: every crop (upscaled by alpha with UCAG's own Psi, whose
    bicubic is checked against torch's in tests/test_upscaling.py), explained alone, channels summed, weighted
    by exp(softmax confidence), brought back to the crop's size, summed and divided by how many crops cover
    each pixel (the paper's Eq. 3-5)."""
    grid = CropGrid(x.shape[-2], x.shape[-1], crop, n)
    height, width = grid.crop_size
    crops = UpscaledCrops(x, grid, (int(height * alpha), int(width * alpha)))  # image-major: image i, crop k
    folded = torch.zeros(x.shape[0], 1, *x.shape[-2:])
    cover = torch.zeros(1, 1, *x.shape[-2:])
    for k, (top, left, bottom, right) in enumerate(grid.boxes()):
        piece = torch.cat([crops[i * grid.num_crops + k:i * grid.num_crops + k + 1] for i in range(x.shape[0])])
        for image in range(x.shape[0]):
            target = int(targets[image])
            attribution = attribute(piece[image:image + 1], target).sum(dim=1, keepdim=True)
            with torch.no_grad():
                confidence = torch.softmax(model(piece[image:image + 1]), dim=1)[0, target].exp()
            shrinking = attribution.shape[-2] > height
            back = F.interpolate(attribution * confidence, size=(height, width), mode="bilinear",
                                 align_corners=False, antialias=shrinking)
            folded[image, :, top:bottom, left:right] += back[0]
        cover[..., top:bottom, left:right] += 1
    return folded / cover


@pytest.mark.parametrize("name, peer, options", [
    ("IntegratedGradients", IntegratedGradients, {"n_steps": 4}),
    ("Saliency", Saliency, {}),
])
def test_ucag_over_captum_equals_the_crops_written_out(lite, two, name, peer, options):
    ucag = UCAG(build_explainer(f"captum:{name}", lite, **options), crop=160, n=2, alpha=1.5)
    ours = ucag(two, TARGETS).maps
    method = peer(lite.model)

    def attribute(piece, target):
        return method.attribute(piece, target=target, **options).detach()

    expected = crop_by_crop(lite.model, two, TARGETS, attribute, 160, 2, 1.5)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_a_callable_explainer_and_its_checks(lite, two):
    def gradient_norm(x, targets):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            score = lite.model(x).gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad.norm(dim=1)  # (B, H, W)

    explainer = CallableExplainer(lite.model, gradient_norm, name="gradnorm")
    maps, logits = explainer(two, TARGETS)
    assert maps.shape == (2, 1, 224, 224) and logits.shape == (2, 1000)
    wrapped = UCAG(gradient_norm, model=lite.model, crop=180, n=2, alpha=1.0)(two, TARGETS).maps
    direct = UCAG(explainer, crop=180, n=2, alpha=1.0)(two, TARGETS).maps
    assert torch.equal(wrapped, direct)
    with pytest.raises(UCAGError, match="model must be"):
        UCAG(gradient_norm)
    bad = {
        "a list": (lambda x, t: [1.0], "returned list, not a tensor"),
        "batch": (lambda x, t: torch.zeros(1, 1, 7, 7), r"maps of shape \(1, 1, 7, 7\) for a batch of 2"),
        "dtype": (lambda x, t: torch.zeros(2, 7, 7, dtype=torch.int64), "int64 maps, not floating point"),
        "nan": (lambda x, t: torch.full((2, 7, 7), float("nan")), "NaN or infinite"),
        "logits": (lambda x, t: (torch.zeros(2, 7, 7), torch.zeros(3, 10)), r"logits \(3, 10\) for a batch of 2"),
    }
    for function, message in bad.values():
        with pytest.raises(MethodError, match=message):
            CallableExplainer(lite.model, function, name="f")(two, TARGETS)


def test_captum_names(lite):
    assert canonical_name("captum:integratedgradients") == "captum:IntegratedGradients"
    with pytest.raises(MethodError, match="did you mean IntegratedGradients"):
        canonical_name("captum:IntegratedGradient")


def test_the_scripts_take_captum_names(tmp_path, capsys):
    def visualize(argv):
        with pytest.raises(SystemExit) as stop:
            run_cli(visualization.main, argv, prog=visualization.PROG)
        captured = capsys.readouterr()
        return stop.value.code, captured.err

    code, err = visualize(["captum:LayerGradCam", "--ucag", "-n", "2", "-a", "1.0", "-c", "180", "--img-path",
                           str(EXAMPLES / "chelsea.jpg"), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0, err
    assert [p.name for p in tmp_path.glob("chelsea_*.png")] == ["chelsea_captum-LayerGradCam.png"]
    code, err = visualize(["captum:NoSuchThing", "--img-path", str(EXAMPLES / "chelsea.jpg"),
                           "--out", str(tmp_path / "x")])
    assert code != 0 and "unknown Captum attribution class" in err and "Traceback" not in err


def test_gradcam_lib_raw_gradcam_is_our_gradcam(lite, two):
    ours = build_explainer("gradcam", lite)(two, TARGETS).maps
    peer = build_explainer("gradcam-lib:GradCAM", lite)(two, TARGETS).maps
    torch.testing.assert_close(peer, ours, rtol=1e-5, atol=1e-6)
    ucag_ours = UCAG(build_explainer("gradcam", lite), crop=180, n=2, alpha=1.0)(two, TARGETS).maps
    ucag_peer = UCAG(build_explainer("gradcam-lib:GradCAM", lite), crop=180, n=2, alpha=1.0)(two, TARGETS).maps
    torch.testing.assert_close(ucag_peer, ucag_ours, rtol=1e-5, atol=1e-6)
    assert hook_count(lite.model) == 0


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_ucag_over_gradcam_lib_eigencam_equals_the_crops_written_out(lite, two):
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    ours = UCAG(build_explainer("gradcam-lib:EigenCAM", lite), crop=160, n=2, alpha=1.5)(two, TARGETS).maps

    def attribute(piece, target):
        cam = EigenCAM(lite.model, [lite.layer])
        try:
            with torch.no_grad():
                cam.activations_and_grads(piece)
            activations = cam.activations_and_grads.activations[0].numpy()
            raw = cam.get_cam_image(piece, lite.layer, [ClassifierOutputTarget(target)], activations, None, False)
        finally:
            cam.activations_and_grads.release()
        return torch.from_numpy(raw)[:, None].float()

    expected = crop_by_crop(lite.model, two, TARGETS, attribute, 160, 2, 1.5)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_gradcam_lib_normalised_maps_lose_the_crop_scale(lite, two):
    """The library's own output (ReLU, min-max per crop, cv2 resize) under UCAG: the crops' relative scales are
    gone, the fold is another map (tests the warning and measures how far, README "Bring your own")."""
    from methods.adapters import GradCamLibExplainer
    raw = UCAG(build_explainer("gradcam-lib:GradCAM", lite), crop=180, n=2, alpha=1.0)
    normalised = UCAG(GradCamLibExplainer(lite.model, "GradCAM", lite.layer, normalised=True), crop=180, n=2,
                      alpha=1.0)
    final_raw = raw.finalize(raw(two, TARGETS).maps, (224, 224)).flatten(1)
    final_normalised = normalised.finalize(normalised(two, TARGETS).maps, (224, 224)).flatten(1)
    correlation = torch.corrcoef(torch.cat([final_raw, final_normalised]))[:2, 2:].diagonal()
    assert torch.all(correlation < 0.999) and torch.all(correlation > 0.5)
    with pytest.warns(RuntimeWarning, match="no raw map in pytorch-grad-cam"):
        build_explainer("gradcam-lib:FullGrad", lite)
    with pytest.raises(MethodError, match="did you mean EigenCAM"):
        canonical_name("gradcam-lib:EigenCam2")
