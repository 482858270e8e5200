"""The explainer contract: batching with per-sample targets, hooks that always come off, devices."""
import pytest
import torch

from methods import available_methods, build_explainer
from methods.hooks import LayerCapture, restored_state
from models import load_model

CAM_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam"]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_registry_lists_cam_methods_and_aliases(lite):
    assert set(CAM_METHODS) <= set(available_methods())
    assert type(build_explainer("GradCAMpp", lite)).__name__ == "GradCAMPlusPlus"


@pytest.mark.parametrize("method", CAM_METHODS)
def test_batch_with_different_targets_equals_one_at_a_time(method, lite, photo_batch):
    explainer = build_explainer(method, lite)
    targets = torch.tensor([285, 1, 967, 872])
    maps, logits = explainer(photo_batch, targets)
    for i in range(len(targets)):
        single_maps, single_logits = explainer(photo_batch[i:i + 1], targets[i:i + 1])
        assert torch.allclose(maps[i], single_maps[0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(logits[i], single_logits[0], rtol=1e-4, atol=1e-5)


def test_targets_none_explains_the_prediction(lite, photo_batch):
    explainer = build_explainer("gradcam", lite)
    maps_pred, logits = explainer(photo_batch)
    maps_explicit, _ = explainer(photo_batch, logits.argmax(1))
    assert torch.allclose(maps_pred, maps_explicit)
    assert logits.argmax(1).tolist() == [872, 285, 967, 665]  # camera->tripod, cat, espresso, moped


def test_maps_are_raw_and_signed(lite, photo_batch):
    maps, _ = build_explainer("gradcam", lite)(photo_batch, [1, 2, 3, 4])  # unlikely classes
    assert float(maps.min()) < 0 < float(maps.max())


def test_bad_targets_raise(lite, photo_batch):
    explainer = build_explainer("gradcam", lite)
    with pytest.raises(ValueError, match="out of range"):
        explainer(photo_batch[:1], [1000])
    with pytest.raises(ValueError, match="targets for a batch"):
        explainer(photo_batch, [1, 2])  # no silent truncation


def test_model_is_restored_after_an_exception_inside_the_explainer(lite, photo_batch):
    model = lite.model
    model.train()
    model.fc.weight.requires_grad_(False)
    before = hook_count(model)
    explainer = build_explainer("gradcam", lite)

    def explode(module, inputs, output):
        raise RuntimeError("boom")

    handle = model.fc.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explainer(photo_batch[:1], [0])
    finally:
        handle.remove()
    assert hook_count(model) == before
    assert model.training and all(m.training for m in model.modules())
    assert model.fc.weight.requires_grad is False
    assert torch.is_grad_enabled()
    model.fc.weight.requires_grad_(True)
    model.eval()


def test_explaining_leaves_no_hooks_and_keeps_grad_mode(lite, photo_batch):
    lite.model.zero_grad(set_to_none=True)  # peers' backward() may have filled .grad
    before = hook_count(lite.model)
    with torch.no_grad():  # callers may be inside no_grad: the CAM still gets its gradients
        maps, _ = build_explainer("layercam", lite)(photo_batch[:2], [1, 2])
        assert not torch.is_grad_enabled()
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert hook_count(lite.model) == before
    assert all(p.grad is None for p in lite.model.parameters())  # no parameter gradients accumulated


def test_inplace_relu_target_layer_keeps_activation_intact():
    torch.manual_seed(0)
    spec = load_model("vgg16", "random")
    assert isinstance(spec.layer, torch.nn.ReLU) and spec.layer.inplace
    x = torch.randn(2, 3, 64, 64)
    maps, logits = build_explainer("gradcam", spec)(x, [3, 7])
    with torch.no_grad():
        assert torch.allclose(logits, spec.model(x), atol=1e-5)
    # reference: activations and gradients by plain autograd on a copy of the graph
    features = spec.model.features
    a = features[:30](x).detach().requires_grad_(True)
    out = spec.model.classifier(torch.flatten(spec.model.avgpool(features[30](a)), 1))
    (g,) = torch.autograd.grad(out.gather(1, torch.tensor([[3], [7]])).sum(), a)
    expected = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-7)


def test_layer_capture_rejects_a_layer_that_runs_twice():
    shared = torch.nn.ReLU()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), shared, torch.nn.Conv2d(4, 4, 3), shared)
    with LayerCapture(shared) as capture, pytest.raises(RuntimeError, match="ran twice"):
        capture.forward(model, torch.randn(1, 3, 8, 8))
    assert hook_count(model) == 0


def test_restored_state_on_exception():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model.train()
    with pytest.raises(KeyError), restored_state(model):
        assert not model.training
        model[0].weight.requires_grad_(False)
        raise KeyError
    assert model.training and model[0].weight.requires_grad
