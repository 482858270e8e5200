"""The layers a sanity check randomises and their random weights (Adebayo et al. 2018, "Sanity checks for
saliency maps"; Sixt et al. 2020 for the random-logit test).

:func:`parameter_layers`: the modules that own parameters directly, from the logits down. :class:`RandomWeights`:
each layer's random parameters and buffers, drawn once on the CPU whatever the model's device, so a run on a GPU
randomises to the very weights a CPU run does. :func:`randomised`: a context manager that keeps the model's
original state and puts it back on exit, also after an exception or a KeyboardInterrupt. :func:`set_step`: the
model at one step of a mode: ``cascading`` step k has the top k + 1 layers randomised (cumulative),
``independent`` step k only layer k (the others original; the same top-down order, so both modes share the
x axis); ``logit`` (the random-logit test) leaves the model unchanged.

How a layer's random weights are drawn: a CPU copy of the module, its ``reset_parameters()`` under
``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed(seed + 1)`` (the call Quantus'
``PyTorchModel.get_random_layer_generator`` makes before each layer, so Quantus' random model and ours hold the
same weights on the CPU; the global CPU generator is left as it was). Like Quantus, every layer is reset after
the same ``manual_seed(seed + 1)``: two layers of the same type and shape get the same draw. A module without
``reset_parameters`` gets each of its own parameters from ``torch.nn.init.normal_(std=0.01)`` under the same
seed (Quantus skips such modules). BatchNorm's ``reset_parameters`` sets its weight to 1, its bias to 0 and
resets its running statistics (mean 0, variance 1, batch count 0), as in Quantus: the randomised BatchNorm is the
identity up to its epsilon. Only a module's own parameters and buffers (``recurse=False``) are copied back: a
reset that also touches child modules (``MultiheadAttention``'s output projection) leaves the children alone,
they are layers of their own.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from common.errors import ToolkitError

MODES = ("cascading", "independent", "logit")
FALLBACK_STD = 0.01  # normal_(std=0.01) for the parameters of a module without reset_parameters


class RandomisationError(ToolkitError):
    """A model the sanity check cannot randomise (no parameters): a one-line error in the scripts."""


def parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that owns parameters directly (``recurse=False``), in ``named_modules()``
    order reversed: from the logits down, the cascading order. A model without parameters: RandomisationError."""
    layers = [(name, module) for name, module in model.named_modules()
              if next(module.parameters(recurse=False), None) is not None]
    if not layers:
        raise RandomisationError(f"the model ({type(model).__name__}) has no parameters: there are no weights "
                                 "to randomise")
    return layers[::-1]


def _own_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (no child's), by attribute name."""
    state = {name: p for name, p in module.named_parameters(recurse=False)}
    state.update({name: b for name, b in module.named_buffers(recurse=False) if b is not None})
    return state


def _cpu_replica(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` to reset: its own parameters and buffers cloned to the host, its children deep
    copies (a reset may touch them), everything else shared (hooks, references to other objects: a deep copy
    of a module could copy a whole explainer or model through them)."""
    replica = copy.copy(module)
    replica._parameters = {name: None if p is None else nn.Parameter(p.detach().to("cpu", copy=True),
                                                                      p.requires_grad)
                           for name, p in module._parameters.items()}
    replica._buffers = {name: None if b is None else b.detach().to("cpu", copy=True)
                        for name, b in module._buffers.items()}
    replica._modules = {name: None if child is None else copy.deepcopy(child).to("cpu")
                        for name, child in module._modules.items()}
    return replica


def draw_layer(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The random own parameters and buffers of ``module``, on the CPU, in their dtypes: a CPU copy reset
    under ``manual_seed(seed + 1)`` (the global CPU generator is restored afterwards)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        replica = _cpu_replica(module)
        torch.manual_seed(seed + 1)
        if hasattr(replica, "reset_parameters"):
            replica.reset_parameters()
        else:
            for parameter in replica.parameters(recurse=False):
                nn.init.normal_(parameter, std=FALLBACK_STD)
        return {name: tensor.detach().clone() for name, tensor in _own_state(replica).items()}


class RandomWeights:
    """Each layer's random state, drawn once per run on the CPU (:func:`draw_layer`) and kept there; ``apply``
    copies a layer's into the model's own tensors, on their device and dtype."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], seed: int):
        self.layers, self.seed = list(layers), seed
        self._drawn: dict[str, dict[str, torch.Tensor]] = {}

    def state(self, index: int) -> dict[str, torch.Tensor]:
        name, module = self.layers[index]
        if name not in self._drawn:
            self._drawn[name] = draw_layer(module, self.seed)
        return self._drawn[name]

    @torch.no_grad()
    def apply(self, index: int) -> None:
        module = self.layers[index][1]
        targets = _own_state(module)
        for name, value in self.state(index).items():
            targets[name].copy_(value)


class Snapshot:
    """A copy of the own parameters and buffers of ``layers`` (on their device, or the host with
    ``host=True``); :meth:`restore` copies them back in place (one layer or all)."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], host: bool = False):
        self.layers = list(layers)
        with torch.no_grad():
            self.saved = [{name: (t.detach().to("cpu", copy=True) if host else t.detach().clone())
                           for name, t in _own_state(module).items()} for _, module in self.layers]

    @torch.no_grad()
    def restore(self, index: int | None = None) -> None:
        for i in range(len(self.layers)) if index is None else [index]:
            targets = _own_state(self.layers[i][1])
            for name, value in self.saved[i].items():
                targets[name].copy_(value)


@contextlib.contextmanager
def randomised(layers: Sequence[tuple[str, nn.Module]], host: bool = False) -> Iterator[Snapshot]:
    """Keep the original state of ``layers``; restore it on exit, after an exception or a KeyboardInterrupt
    too. ``host``: the copy lives in host memory (a GPU model whose copy would not fit beside it)."""
    snapshot = Snapshot(layers, host)
    try:
        yield snapshot
    finally:
        snapshot.restore()


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """CPU arithmetic with denormal floats flushed to zero inside the block, PyTorch's default (off) again after
    it (PyTorch has no getter for the mode): the gradients of a deeply randomised network underflow into
    denormals, which a CPU computes several times slower (lite0, gradient, every layer random: 6 x). Only
    float32 magnitudes below 1.2e-38 change (to 0)."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def set_step(weights: RandomWeights, snapshot: Snapshot, mode: str, index: int) -> None:
    """Put the model in step ``index`` of ``mode`` (inside :func:`randomised`, steps in order 0, 1, ...):
    cascading randomises layer ``index`` on top of the earlier ones; independent first restores layer
    ``index - 1``, then randomises layer ``index``."""
    if mode == "independent" and index:
        snapshot.restore(index - 1)
    weights.apply(index)
