"""The one activation capture (methods/hooks.py LayerCapture) on one or several layers: what it records, the
graph cut, in-place safety, repeated and missing layers, hooks always removed."""
import pytest
import torch
from torch import nn

from methods.hooks import LayerCapture


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 5, 3), nn.ReLU(inplace=True),
                         nn.Conv2d(5, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def reference(model, x, cuts=(0, 2, 4)):
    """Outputs of the layers at ``cuts`` (before any in-place op) and d(sum of class 1)/d each, by plain
    autograd on the pieces of the network, no hooks."""
    outputs, grads = [], []
    for cut in cuts:
        start = model[:cut + 1](x).detach().requires_grad_(True)
        score = model[cut + 1:](start.clone())[:, 1].sum()
        (grad,) = torch.autograd.grad(score, start)
        outputs.append(start.detach())
        grads.append(grad)
    return outputs, grads


def test_several_layers_in_execution_order_with_their_gradients():
    model, x = small_net(), torch.randn(2, 3, 12, 12)
    layers = {"deep": model[4], "shallow": model[0], "middle": model[2]}  # any order: recorded as they run
    with torch.enable_grad(), LayerCapture(layers) as capture:
        logits = capture.forward(model, x)
        names = [name for name, _ in capture.records]
        acts = [act for _, act in capture.records]
        grads = torch.autograd.grad(logits[:, 1].sum(), acts)
    assert names == ["shallow", "middle", "deep"]
    assert list(capture.activations) == names
    outputs, expected = reference(model, x)
    for act, out, grad, exp in zip(acts, outputs, grads, expected, strict=True):
        assert torch.allclose(act, out, atol=1e-6)  # intact although a ReLU(inplace=True) follows
        assert torch.allclose(grad, exp, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
    assert hook_count(model) == 0


def test_graph_cut_at_the_first_recorded_layer():
    model, x = small_net(), torch.randn(1, 3, 12, 12)
    with torch.enable_grad(), LayerCapture({"a": model[2], "b": model[4]}) as capture:
        logits = capture.forward(model, x)
    first, second = capture.activations["a"], capture.activations["b"]
    assert first.is_leaf and first.requires_grad          # nothing before it is in the graph
    assert not second.is_leaf and second.requires_grad    # the deeper one hangs off the first
    assert logits.requires_grad and torch.is_grad_enabled()
    with torch.no_grad(), LayerCapture(model[2]) as capture:  # a no-grad caller is served, its mode kept
        capture.forward(model, x)
        assert capture.activation.requires_grad and not torch.is_grad_enabled()


def test_without_the_cut_the_graph_reaches_the_input_and_no_grad_builds_none():
    model = small_net()
    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    with LayerCapture({"a": model[2]}, cut_graph=False) as capture:
        logits = capture.forward(model, x)
    (grad_x,) = torch.autograd.grad(logits[:, 1].sum(), x)
    assert grad_x.abs().sum() > 0 and not capture.activation.is_leaf
    with torch.no_grad(), LayerCapture(model[0], cut_graph=False) as capture:
        logits = capture.forward(model, x)
    assert not capture.activation.requires_grad and not logits.requires_grad
    assert torch.allclose(capture.activation, model[0](x).detach())  # intact past the in-place ReLU


def test_posts_apply_per_layer():
    model, x = small_net(), torch.randn(1, 3, 12, 12)
    with LayerCapture({"a": model[0], "b": model[2]}, {"b": torch.relu}) as capture:
        capture.forward(model, x)
    a, b = capture.activations["a"], capture.activations["b"]
    assert float(a.detach().min()) < 0 and float(b.detach().min()) >= 0  # only b's post ran
    with LayerCapture(model[0], torch.relu) as capture:  # one post for one layer
        capture.forward(model, x)
    assert float(capture.activation.detach().min()) >= 0


def test_a_branch_independent_of_the_first_layer_with_frozen_weights_is_a_leaf_of_its_own():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return (self.left(x) * self.right(x)).flatten(1)

    model, x = TwoBranches(), torch.randn(2, 3, 4, 4)
    model.requires_grad_(False)  # as SISE: else the right branch joins the graph through its weights
    with torch.enable_grad(), LayerCapture({"l": model.left, "r": model.right}) as capture:
        out = capture.forward(model, x)
        left, right = capture.activations["l"], capture.activations["r"]
        grad_l, grad_r = torch.autograd.grad(out.sum(), [left, right])
    assert left.is_leaf and right.is_leaf
    assert torch.equal(grad_l, right.detach()) and torch.equal(grad_r, left.detach())


def test_repeated_and_missing_layers():
    shared = nn.ReLU()
    unused = nn.Conv2d(1, 1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Conv2d(4, 4, 3), shared)
    x = torch.randn(1, 3, 8, 8)
    with LayerCapture({"shared": shared, "unused": unused}, cut_graph=False, each_call=True) as capture:
        capture.forward(model, x)
    assert [name for name, _ in capture.records] == ["shared", "shared"]  # both calls, the unused one fine
    with LayerCapture({"shared": shared}) as capture, pytest.raises(RuntimeError, match="layer 'shared' ran twice"):
        capture.forward(model, x)
    with LayerCapture({"first": model[0], "unused": unused}) as capture, \
            pytest.raises(RuntimeError, match="layers unused did not run"):
        capture.forward(model, x)
    with LayerCapture(unused) as capture, pytest.raises(RuntimeError, match="the target layer did not run"):
        capture.forward(model, x)
    assert hook_count(model) == 0 and hook_count(unused) == 0


def test_non_tensor_outputs_are_refused_and_hooks_come_off_on_errors():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    pair = Pair()
    model = nn.Sequential(pair)
    with LayerCapture({"pair": pair}) as capture, pytest.raises(RuntimeError, match="layer 'pair' returns tuple"):
        capture.forward(model, torch.randn(1, 3))
    assert hook_count(model) == 0
    with pytest.raises(KeyError), LayerCapture({"pair": pair}):
        assert hook_count(model) == 1
        raise KeyError
    assert hook_count(model) == 0
