"""NormGrad: hand-computed numbers, the per-position weight gradient by autograd (the definition), the
authors' TorchRay-fork formulas written out independently on random VGG16 / ResNet50, batches, errors."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods import build_explainer
from methods.errors import MethodError
from methods.normgrad import NormGrad
from models import load_model
from models.timm_models import timm_spec


def hand_network():
    """x (3, 1, 2) -> 1x1 conv a = (x0, 2 x1) -> S_0 = a[0, u0] + 2 a[1, u1] (flattened linear head)."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    head = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0]])[:, :, None, None])
        head.weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 1, 1, 0]]))
    return nn.Sequential(conv, nn.Flatten(), head).eval()


HAND_X = torch.tensor([[1.0, 3.0], [1.0, 3.0], [5.0, 5.0]])[None, :, None, :]  # (1, 3, 1, 2): x_u0, x_u1


@pytest.mark.parametrize("variant,expected", [
    # a_u0 = (1, 2), a_u1 = (3, 6); g_u0 = dS/da_u0 = (1, 0), g_u1 = (0, 2)
    ("identity", [1 * 5 ** 0.5, 2 * 45 ** 0.5]),    # ||g_u|| ||a_u||
    ("selective", [1.0, 12.0]),                      # ||max(a_u g_u, 0)||: (1, 0) and (0, 12)
    ("conv", [1 * 27 ** 0.5, 2 * 43 ** 0.5]),        # ||g_u|| ||x_u||, x_u0 = (1, 1, 5), x_u1 = (3, 3, 5)
])
def test_hand_computed_maps(variant, expected):
    model = hand_network()
    maps, logits = NormGrad(model, model[0], normgrad_variant=variant)(HAND_X, [0])
    assert torch.allclose(logits, torch.tensor([[13.0, 5.0]]))
    assert maps.shape == (1, 1, 1, 2)
    assert torch.allclose(maps.flatten(), torch.tensor(expected), rtol=1e-6)


def per_position_weight_gradient_norm(model, layer, x, targets, conv: nn.Conv2d | None = None):
    """The definition by autograd: every output position u gets its own copy W_u of a weight, the network runs
    with it, and the map is ||dS/dW_u||_F. conv=None: W_u a virtual 1x1 identity (C x C) applied to the
    layer's output; otherwise W_u a copy of the convolution's weight applied to its unfolded input patches."""
    copies = {}

    def identity_hook(module, inputs, output):
        b, c, h, w = output.shape
        weight = torch.eye(c).expand(b, h, w, c, c).clone().requires_grad_(True)
        copies["w"] = weight
        return torch.einsum("bhwij,bjhw->bihw", weight, output)

    def conv_hook(module, inputs, output):
        (x_in,) = inputs
        b, _, h, w = output.shape
        groups, c_out = module.groups, module.out_channels
        patches = F.unfold(padded_input(module, x_in), module.kernel_size, dilation=module.dilation,
                           stride=module.stride)                                    # (B, C_in k k, L)
        patches = patches.unflatten(1, (groups, -1))                                # (B, G, C_in/G k k, L)
        weight = module.weight.detach().reshape(groups, c_out // groups, -1)        # (G, O/G, C_in/G k k)
        weight = weight.expand(b, h * w, *weight.shape).clone().requires_grad_(True)
        copies["w"] = weight
        out = torch.einsum("blgoi,bgil->bgol", weight, patches).reshape(b, c_out, h, w)
        return out if module.bias is None else out + module.bias.detach()[:, None, None]

    handle = (conv or layer).register_forward_hook(identity_hook if conv is None else conv_hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            logits.gather(1, torch.as_tensor(targets)[:, None]).sum().backward()
    finally:
        handle.remove()
    grad = copies["w"].grad
    if conv is None:
        return torch.linalg.vector_norm(grad, dim=(3, 4))[:, None]
    h, w = model_output_size(model, conv, x)
    return torch.linalg.vector_norm(grad, dim=(2, 3, 4)).reshape(-1, 1, h, w)


def padded_input(conv, x):
    """x padded as ``conv`` pads it: its padding and padding mode, "same" split as PyTorch splits it, or the
    TensorFlow "same" padding of EfficientNet-Lite's Conv2dDynamicSamePadding (computed from the input size)."""
    sides = []
    for size, k, s, d, p in zip(x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation,
                                (conv.padding,) * 2 if isinstance(conv.padding, str) else conv.padding, strict=True):
        if type(conv).__name__ == "Conv2dDynamicSamePadding":
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        else:
            total = {"same": d * (k - 1), "valid": 0}[p] if isinstance(p, str) else 2 * p
        sides.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = sides
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, [left, right, top, bottom], mode=mode)


def model_output_size(model, layer, x):
    sizes = []
    handle = layer.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2:]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return sizes[0]


def small_cnn(groups=1, stride=2, padding=1, dilation=1, padding_mode="zeros"):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  padding_mode=padding_mode), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_identity_equals_the_virtual_identity_weight_gradient_by_autograd():
    model = small_cnn()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    maps, _ = NormGrad(model, model[1])(x, [0, 2, 4])
    expected = per_position_weight_gradient_norm(model, model[1], x, [0, 2, 4])
    assert maps.shape == expected.shape == (3, 1, 12, 12)
    assert torch.allclose(maps, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("conv_options", [dict(groups=1, stride=2, padding=1, dilation=1),
                                          dict(groups=2, stride=1, padding="same", dilation=2),
                                          dict(groups=8, stride=2, padding=0, dilation=1),
                                          dict(groups=1, stride=1, padding=2, dilation=1, padding_mode="reflect")],
                         ids=["strided", "grouped-same-dilated", "depthwise-valid", "reflect"])
def test_conv_equals_the_convolutions_own_weight_gradient_by_autograd(conv_options):
    model = small_cnn(**conv_options)
    x = torch.randn(2, 3, 13, 13, generator=torch.Generator().manual_seed(2))
    maps, _ = NormGrad(model, model[2], normgrad_variant="conv")(x, [1, 3])
    expected = per_position_weight_gradient_norm(model, None, x, [1, 3], conv=model[2])
    assert maps.shape == expected.shape
    assert torch.allclose(maps, expected, rtol=1e-5, atol=1e-7)


def fork_norm_grad(model, layer, x, target, variant="identity"):
    """The TorchRay fork's computation, written out: the output of ``layer`` kept with retain_grad, a backward
    of the one-hot target gradient (its pointing gradient at a (1, K) output), then the variant's formula."""
    store = {}

    def keep_output(module, inputs, output):
        output.retain_grad()
        store["out"] = output

    def keep_input(module, inputs):
        store["in"] = inputs[0].detach().clone()

    handles = [layer.register_forward_hook(keep_output)]
    if variant == "conv":
        handles.append(layer.register_forward_pre_hook(keep_input))
    try:
        with torch.enable_grad():
            output = model(x)
            output.backward(F.one_hot(torch.tensor([target]), output.shape[1]).float())
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    act, grad = store["out"].detach(), store["out"].grad
    if variant == "identity":
        return torch.norm(grad, 2, 1, keepdim=True) * torch.norm(act, 2, 1, keepdim=True)
    if variant == "selective":
        return torch.norm(torch.clamp(act * grad, min=0), 2, 1, keepdim=True)
    patches = F.unfold(store["in"], layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                       stride=layer.stride)
    return torch.norm(grad, 2, 1, keepdim=True) * torch.norm(patches, 2, 1, keepdim=True).view(1, 1, *grad.shape[2:])


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    for module in model.modules():  # the fork's Probe turns in-place ReLUs off; the numbers are the same
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.mark.parametrize("model_name,variant,layer,targets,seed", [
    ("vgg16", "identity", "features.29", [7, 300], 3), ("vgg16", "selective", "features.29", [7, 300], 3),
    ("vgg16", "conv", "features.28", [7, 300], 3), ("resnet50", "identity", "layer4", [5, 999], 4),
    ("resnet50", "selective", "layer4", [5, 999], 4), ("resnet50", "conv", "layer4.2.conv3", [5, 999], 4)])
def test_equals_the_fork(model_name, variant, layer, targets, seed, request):
    model = request.getfixturevalue(model_name)
    module = model.get_submodule(layer)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    maps, _ = NormGrad(model, module, normgrad_variant=variant)(x, targets)
    for i, target in enumerate(targets):  # the fork explains one image at a time
        expected = fork_norm_grad(model, module, x[i:i + 1], target, variant)
        assert torch.allclose(maps[i:i + 1], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


@pytest.mark.parametrize("variant", ["identity", "selective", "conv"])
def test_a_batch_equals_its_images_one_by_one(variant):
    model = small_cnn(groups=2)
    layer = model[2] if variant == "conv" else model[3]
    explainer = NormGrad(model, layer, normgrad_variant=variant)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    targets = [0, 4, 2, 2]
    maps, _ = explainer(x, targets)
    singles = torch.cat([explainer(x[i:i + 1], [t]).maps for i, t in enumerate(targets)])
    assert torch.allclose(maps, singles, rtol=1e-5, atol=1e-7)


def test_registry_defaults_to_the_identity_variant_at_the_cam_layer():
    torch.manual_seed(0)
    spec = load_model("resnet18", "random")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    explainer = build_explainer("norm-grad", spec)
    assert explainer.variant == "identity" and explainer.layer is spec.layer
    maps, _ = explainer(x, [1, 2])
    explicit, _ = NormGrad(spec.model, spec.layer, normgrad_variant="identity")(x, [1, 2])
    assert maps.shape == (2, 1, 2, 2) and torch.equal(maps, explicit)


def test_the_embedded_efficientnet_lite_and_its_depthwise_conv():
    spec = load_model("efficientnet_lite0")
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    maps, _ = build_explainer("normgrad", spec)(x, [3])
    assert maps.shape == (1, 1, 3, 3) and torch.isfinite(maps).all() and float(maps.min()) >= 0
    depthwise = spec.with_layer("blocks.15._depthwise_conv")
    maps, _ = build_explainer("normgrad", depthwise, normgrad_variant="conv")(x, [3])
    expected = per_position_weight_gradient_norm(spec.model, None, x, [3], conv=depthwise.layer)
    assert torch.allclose(maps, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_a_vit_through_its_token_layout_equals_the_definition_on_the_tokens():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10).eval()
    spec = dataclasses.replace(timm_spec(model, "tiny_vit"), input_size=(32, 32))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    maps, _ = build_explainer("normgrad", spec)(x, [1, 6])
    tokens = {}

    def keep(module, inputs, output):
        output.retain_grad()
        tokens["t"] = output

    handle = spec.layer.register_forward_hook(keep)
    with torch.enable_grad():
        model(x).gather(1, torch.tensor([[1], [6]])).sum().backward()
    handle.remove()
    patch, grad = tokens["t"][:, model.num_prefix_tokens:].detach(), tokens["t"].grad[:, model.num_prefix_tokens:]
    expected = (grad.norm(dim=2) * patch.norm(dim=2)).reshape(2, 1, 4, 4)
    assert torch.allclose(maps, expected, rtol=1e-5, atol=1e-7)


def test_user_mistakes_are_one_line_method_errors():
    torch.manual_seed(0)
    spec = load_model("resnet18", "random")
    with pytest.raises(MethodError, match="^normgrad: normgrad_variant must be one of identity, selective, conv"):
        build_explainer("normgrad", spec, normgrad_variant="multi")
    with pytest.raises(MethodError, match="needs a Conv2d target layer.*got Sequential"):
        build_explainer("normgrad", spec, normgrad_variant="conv")
    with pytest.raises(MethodError, match="needs a Conv2d target layer.*got ReLU"):
        build_explainer("normgrad", spec.with_layer("layer4.1.relu"), normgrad_variant="conv")
