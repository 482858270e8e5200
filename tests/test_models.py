"""Model registry: the embedded model, the paper's torchvision models, auto target layers, weights files."""
from urllib.error import URLError

import pytest
import torch
import torchvision

from methods import build_explainer
from methods.hooks import LayerCapture
from models import PAPER_MODELS, available_models, imagenet_categories, load_model
from models.efficientnet_lite import build_package_network, packaged_weights_path
from models.errors import ModelError
from models.target_layer import find_target_layer
from ucag import UCAG


def test_embedded_model_equals_the_package_network(lite, photo_batch):
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    package_net = build_package_network(state).eval()
    with torch.no_grad():
        assert torch.allclose(lite.model(photo_batch), package_net(photo_batch), atol=1e-5)
    assert lite.target_layer == "head"
    with LayerCapture(lite.layer) as capture:
        capture.forward(lite.model, photo_batch[:1])
    assert capture.activation.shape == (1, 1280, 7, 7)


def test_embedded_model_is_trained(lite, photo_batch):
    with torch.no_grad():
        probabilities = torch.softmax(lite.model(photo_batch), 1)
    top = probabilities.max(1)
    names = [lite.categories[i] for i in top.indices]
    assert names == ["tripod", "Egyptian cat", "espresso", "moped"]
    assert float(top.values[:3].min()) > 0.8


def size_for(spec):
    return max(64, spec.min_side + 40)


@pytest.mark.parametrize("name", ["efficientnet_lite0", *PAPER_MODELS, "mobilenet_v2", "resnet18"])
def test_every_model_runs_gradcam_and_ucag(name):
    torch.manual_seed(0)
    spec = load_model(name, "default" if name == "efficientnet_lite0" else "random")
    side = size_for(spec)
    x = torch.randn(2, 3, side, side)
    explainer = build_explainer("gradcam", spec)
    maps, logits = explainer(x, [1, 2])
    assert maps.dim() == 4 and maps.shape[:2] == (2, 1) and logits.shape == (2, 1000)
    assert torch.isfinite(maps).all()
    crop = 224 * 0.75
    ucag = UCAG(explainer, crop=crop, n=2, alpha=max(1.0, spec.min_side / int(crop * side / 224)) + 0.01)
    ucag_maps, _ = ucag(x, [1, 2])
    assert ucag_maps.shape == (2, 1, side, side) and torch.isfinite(ucag_maps).all()


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_auto_detection_agrees_with_the_papers_layers(name):
    spec = load_model(name, "random")
    assert spec.target_layer == PAPER_MODELS[name]["target_layer"]
    assert find_target_layer(spec.model, spec.input_size) == spec.target_layer


def test_paper_models_input_sizes():
    assert load_model("inception_v3", "random").input_size == (299, 299)
    assert load_model("resnet50", "random").input_size == (224, 224)


def test_densenet_activation_is_taken_after_its_final_relu():
    torch.manual_seed(0)
    spec = load_model("densenet121", "random")
    with LayerCapture(spec.layer, spec.activation_post) as capture:
        logits = capture.forward(spec.model, torch.randn(1, 3, 64, 64))
    activation = capture.activation.detach()
    assert float(activation.min()) >= 0 and float(activation.max()) > 0
    assert logits.shape == (1, 1000)


def test_other_torchvision_models_get_a_layer_automatically_and_can_be_overridden():
    spec = load_model("mobilenet_v3_small", "random")
    assert spec.target_layer == "features"
    spec = load_model("resnet18", "random", target_layer="layer3")
    assert spec.target_layer == "layer3"
    with pytest.raises(ModelError, match="target layer 'layer9' not found"):
        load_model("resnet18", "random", target_layer="layer9")


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as error:
        load_model("resnet5000")
    assert "efficientnet_lite0" in str(error.value) and "resnet50" in str(error.value)
    assert "efficientnet_lite0" in available_models() and "vgg19" in available_models()


def test_missing_torchvision_weights_give_one_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as error:
        load_model("resnet50")
    message = str(error.value)
    assert "resnet50-0676ba61.pth" in message and str(tmp_path) in message
    assert "--weights PATH" in message and "\n" not in message


def test_weights_path_accepts_nested_and_dataparallel_checkpoints(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    spec = load_model("resnet18", str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(spec.model(x), reference(x))


def test_inception_checkpoint_loads_with_pretrained_architecture(tmp_path):
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    spec = load_model("inception_v3", str(path))
    assert spec.model.transform_input is True


def test_bad_weights_files(tmp_path):
    with pytest.raises(ModelError, match="weights file not found"):
        load_model("resnet18", str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_model("resnet18", str(junk))
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(num_classes=20).state_dict(), wrong)
    with pytest.raises(ModelError, match="does not fit resnet18"):
        load_model("resnet18", str(wrong))


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        load_model("resnet18", "random")


def test_imagenet_categories():
    categories = imagenet_categories()
    assert len(categories) == 1000 and categories[0] == "tench" and categories[285] == "Egyptian cat"
