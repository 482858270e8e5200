"""Raw CAM maps against independent implementations: pytorch-grad-cam and captum (test-only deps).

pytorch-grad-cam records A and dS/dA with its own hooks and backward pass; ``get_cam_image`` returns its
map before the ReLU and normalisation it applies later, i.e. the raw map our contract returns.
"""
import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM as PeerGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PeerGradCAMPlusPlus
from pytorch_grad_cam import LayerCAM as PeerLayerCAM
from pytorch_grad_cam import XGradCAM as PeerXGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from methods import GradCAM, GradCAMPlusPlus, LayerCAM, WGradCAM, XGradCAM

TARGETS = [285, 967, 872, 665]
PEERS = {GradCAM: PeerGradCAM, GradCAMPlusPlus: PeerGradCAMPlusPlus, XGradCAM: PeerXGradCAM,
         LayerCAM: PeerLayerCAM}


def peer_raw_maps(peer_cls, model, layer, x, targets):
    """pytorch-grad-cam's activations, gradients and pre-ReLU CAM image for the batch."""
    cam = peer_cls(model=model, target_layers=[layer])
    try:
        outputs = cam.activations_and_grads(x)
        peer_targets = [ClassifierOutputTarget(t) for t in targets]
        model.zero_grad()
        sum(target(output) for target, output in zip(peer_targets, outputs, strict=True)).backward()
        activations = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, layer, peer_targets, activations, grads, eigen_smooth=False)
        return np.asarray(raw), activations, grads
    finally:
        cam.activations_and_grads.release()


def assert_close(ours: torch.Tensor, peer: np.ndarray, rtol=1e-4):
    ours = ours.numpy()
    scale = np.abs(peer).max()
    np.testing.assert_allclose(ours, peer, rtol=rtol, atol=rtol * scale)


@pytest.fixture(params=["lite", "resnet_random"])
def model_and_input(request, photo_batch):
    spec = request.getfixturevalue(request.param)
    return spec, photo_batch


@pytest.mark.parametrize("ours_cls", [GradCAM, XGradCAM, LayerCAM])
def test_cam_maps_equal_pytorch_grad_cam(ours_cls, model_and_input):
    spec, x = model_and_input
    maps, logits = ours_cls(spec.model, spec.layer)(x, TARGETS)
    peer, _, _ = peer_raw_maps(PEERS[ours_cls], spec.model, spec.layer, x, TARGETS)
    assert maps.shape == (4, 1, 7, 7)
    assert_close(maps[:, 0], peer)
    with torch.no_grad():
        assert torch.allclose(logits, spec.model(x), atol=1e-5)


def test_gradcam_plus_plus_equals_pytorch_grad_cam_with_its_eps(model_and_input):
    spec, x = model_and_input
    peer, _, _ = peer_raw_maps(PeerGradCAMPlusPlus, spec.model, spec.layer, x, TARGETS)
    maps, _ = GradCAMPlusPlus(spec.model, spec.layer, alpha_eps=1e-6)(x, TARGETS)
    assert_close(maps[:, 0], peer)


def test_gradcam_plus_plus_default_is_the_papers_closed_form(model_and_input):
    """Without eps, alpha = g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g) where g != 0."""
    spec, x = model_and_input
    _, activations, grads = peer_raw_maps(PeerGradCAMPlusPlus, spec.model, spec.layer, x, TARGETS)
    a, g = activations.astype(np.float64), grads.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(g != 0, 1.0 / (2.0 + a.sum(axis=(2, 3), keepdims=True) * g), 0.0)
    weights = (alpha * np.maximum(g, 0)).sum(axis=(2, 3))
    expected = (weights[:, :, None, None] * a).sum(axis=1)
    maps, _ = GradCAMPlusPlus(spec.model, spec.layer)(x, TARGETS)
    assert_close(maps[:, 0].double(), expected)


def test_gradcam_equals_captum_layer_gradcam(model_and_input):
    spec, x = model_and_input
    captum_maps = LayerGradCam(spec.model, spec.layer).attribute(x, target=TARGETS, relu_attributions=False)
    maps, _ = GradCAM(spec.model, spec.layer)(x, TARGETS)
    assert_close(maps, captum_maps.detach().numpy())


def test_wgradcam_weights_gradients_by_the_feature_map(model_and_input):
    """Weighted Grad-CAM from pytorch-grad-cam's own A and dS/dA: w_c = mean_ij A_ij g_ij, and the map is
    XGrad-CAM's with each channel weight scaled by the channel's mean activation."""
    spec, x = model_and_input
    maps, _ = WGradCAM(spec.model, spec.layer)(x, TARGETS)
    _, activations, grads = peer_raw_maps(PeerGradCAM, spec.model, spec.layer, x, TARGETS)
    weights = (activations * grads).mean(axis=(2, 3))
    assert_close(maps[:, 0], (weights[:, :, None, None] * activations).sum(axis=1))
    a, g = torch.from_numpy(activations).double(), torch.from_numpy(grads).double()
    active = a.sum(dim=(2, 3)) > 0                       # XGrad-CAM's weight is 0/0 on dead channels
    scaled = XGradCAM(spec.model, spec.layer, activation_sum_eps=0.0).channel_weights(a, g) * a.mean(dim=(2, 3))
    ours = WGradCAM(spec.model, spec.layer).channel_weights(a, g)
    assert torch.allclose(ours[active], scaled[active], rtol=1e-10)
    assert (ours[~active] == 0).all()
