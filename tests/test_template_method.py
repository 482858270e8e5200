"""The explainer template method (methods.base.Explainer.__call__): targets normalised and range-checked once
per user-facing call, the model's state restored and the precision applied around the subclass's computation,
which receives resolved (B,) int64 targets; wrappers enter through explain_resolved, without a re-check."""
import contextvars

import pytest
import torch
from torch import nn

import methods.base as base
from methods import Explainer, Explanation
from ucag import UCAG

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 5


class CountingNet(nn.Module):
    """A tiny classifier (K = 5) that counts its forwards and records whether it ran in train mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, CLASSES))
        self.forwards, self.modes = 0, []

    def forward(self, x):
        self.forwards += 1
        self.modes.append(self.training)
        return self.body(x)


class Recording(Explainer):
    """The computation only: it records the targets it receives and the model's mode, and returns the targets
    as the map (so the resolved classes can be read back) with the model's logits."""

    name = "recording"

    def __init__(self, model):
        super().__init__(model)
        self.received = []

    def explain(self, x, targets):
        assert isinstance(targets, torch.Tensor) and targets.dtype == torch.int64 and targets.shape == (len(x),)
        self.received.append(targets.clone())
        logits = self.model(x)
        maps = targets.to(x.dtype).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]).clone()
        return Explanation(maps, logits.detach())


@pytest.fixture
def net():
    return CountingNet()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16)


@pytest.mark.parametrize("targets", [None, 2, [4, 0, 1], torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3, 3, 3])])
def test_the_computation_receives_resolved_int64_targets_never_none(net, x, targets):
    explainer = Recording(net)
    maps, logits = explainer(x, targets)
    (received,) = explainer.received
    if targets is None:
        with torch.no_grad():
            assert torch.equal(received, net(x).argmax(dim=1))  # the prediction, argmax of the same logits
    else:
        assert torch.equal(received, torch.as_tensor(targets).long().expand(3))
    assert torch.equal(maps[:, 0, 0, 0].long(), received)


def test_an_extra_forward_only_without_targets(net, x):
    explainer = Recording(net)
    explainer(x, [0, 1, 2])        # K is learned once: the first call with given targets probes the model
    assert net.forwards == 2
    explainer(x, [0, 1, 2])        # then: the computation's own forward only
    assert net.forwards == 3
    explainer(x)                   # no target given: one no-grad forward for the prediction
    assert net.forwards == 5


def test_out_of_range_targets_are_refused_before_the_computation(net, x):
    explainer = Recording(net)
    for bad in ([0, 1, CLASSES], [-1, 0, 0]):
        with pytest.raises(base.MethodError, match="out of range"):
            explainer(x, bad)
    assert explainer.received == []


def test_ucag_checks_once_per_call_and_its_crops_are_not_rechecked(net, x, monkeypatch):
    inner = Recording(net)
    ucag = UCAG(inner, crop=150, n=3, alpha=1.0, patch_batch=2)  # 3 images x 9 crops in chunks of 2: 14 chunks
    checks = []
    check = base.check_target_range
    monkeypatch.setattr(base, "check_target_range", lambda t, k: checks.append(len(t)) or check(t, k))
    ucag(x, [1, 2, 3])
    assert checks == [3] and len(inner.received) == 14
    assert torch.equal(torch.cat(inner.received), torch.tensor([1, 2, 3]).repeat_interleave(9))
    with pytest.raises(base.MethodError, match="out of range"):
        ucag(x, [1, 2, CLASSES])
    assert checks == [3, 3] and len(inner.received) == 14  # refused before any crop ran
    with pytest.raises(base.MethodError, match="out of range"):  # the wrapper's trust does not outlive it
        inner(x, [1, 2, CLASSES])


def test_explain_resolved_applies_state_and_precision_without_a_check(net, x):
    class Float32Only(Recording):
        mixed_precision = False

        def explain(self, x, targets):
            assert not torch.is_autocast_enabled("cpu")  # the float32 opt-out, also inside a bf16 region
            return super().explain(x, targets)

    explainer = Float32Only(net)
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps, logits = explainer.explain_resolved(x, torch.tensor([0, 1, 2]))
    assert net.modes == [False] and net.training  # eval mode for the computation, train mode restored
    assert logits.dtype == torch.float32 and net.forwards == 1  # no probe, no check: the caller checked


def test_half_precision_results_are_widened(net, x):
    class Half(Recording):
        def explain(self, x, targets):
            maps, logits = super().explain(x, targets)
            return Explanation(maps.bfloat16(), logits.bfloat16())

    maps, logits = Half(net)(x, [0, 1, 2])
    assert maps.dtype == logits.dtype == torch.float32


def test_targets_need_no_context_state(net, x):
    """Nothing module-level carries a 'checked' flag between calls (the former ContextVar): a run inside a
    copied context checks exactly as one outside it."""
    assert not [name for name, value in vars(base).items() if isinstance(value, contextvars.ContextVar)]
    explainer = Recording(net)
    with pytest.raises(base.MethodError, match="out of range"):
        contextvars.copy_context().run(explainer, x, [0, 0, CLASSES])
