"""Multi-label VOC/COCO models: torchvision-layout and TorchRay (Caffe-converted) checkpoints."""
import re

import pytest
import torch
import torchvision

from evaluation.localization_data import VOC_CLASSES
from models.errors import ModelError
from models.multilabel import CAFFE_MEAN, caffe_architecture, load_multilabel


def torchray_layout(arch, state_dict):
    """What TorchRay's checkpoints look like: the inverse of our conversion, written independently."""
    out = {}
    for key, value in state_dict.items():
        value = value.clone()
        if arch == "vgg16":
            key = {"classifier.3.weight": "classifier.2.weight", "classifier.3.bias": "classifier.2.bias",
                   "classifier.6.weight": "classifier.4.weight", "classifier.6.bias": "classifier.4.bias"}.get(key, key)
            if key == "classifier.0.weight":
                value = value.reshape(value.shape[0], 512, 7, 7)
        else:
            match = re.match(r"(.*bn\d|.*downsample\.1)\."
                             r"(weight|bias|running_mean|running_var|num_batches_tracked)$", key)
            if match:  # Caffe splits BatchNorm (statistics, .0) from Scale (affine, .1)
                scale = match.group(2) in ("weight", "bias")
                key = f"{match.group(1)}.{1 if scale else 0}.{match.group(2)}"
        out[key] = value
    first = "features.0.weight" if arch == "vgg16" else "conv1.weight"
    out[first] = out[first][:, [2, 1, 0]]  # Caffe models take BGR
    return out


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_torchray_checkpoint_loads_into_the_caffe_architecture(arch, tmp_path):
    torch.manual_seed(0)
    reference = caffe_architecture(arch, torchvision.models.get_model(arch, weights=None, num_classes=20)).eval()
    for module in reference.modules():  # non-trivial BN statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{arch}_voc.pth.tar"
    torch.save(torchray_layout(arch, reference.state_dict()), path)
    spec = load_multilabel(arch, VOC_CLASSES, str(path))
    assert spec.caffe and not spec.resize_antialias and spec.mean == CAFFE_MEAN and spec.keep_aspect and spec.multilabel
    x = torch.randn(1, 3, 224, 250)
    with torch.no_grad():
        assert torch.allclose(spec.model(x), reference(x), atol=1e-4)
    if arch == "resnet50":
        assert spec.model.conv1.bias is not None and spec.model.layer2[0].conv1.stride == (2, 2)
    assert all(m.ceil_mode for m in spec.model.modules() if isinstance(m, torch.nn.MaxPool2d))


def test_torchvision_layout_checkpoint_and_errors(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet50(num_classes=80).eval()
    path = tmp_path / "resnet50_coco.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    spec = load_multilabel("resnet50", [f"c{i}" for i in range(80)], str(path))
    assert not spec.caffe and spec.resize_antialias and spec.target_layer == "layer4"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(spec.model(x), model(x), atol=1e-5)
    with pytest.raises(ModelError, match="80-class head; this dataset has 20 classes"):
        load_multilabel("resnet50", VOC_CLASSES, str(path))
    with pytest.raises(ModelError, match="needs --weights PATH"):
        load_multilabel("vgg16", VOC_CLASSES, "default")
    with pytest.raises(ModelError, match="supports --name vgg16 or resnet50"):
        load_multilabel("densenet121", VOC_CLASSES, "random")
