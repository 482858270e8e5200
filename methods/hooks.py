"""Context managers that touch a model and always put it back: state restore and activation capture."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def restored_state(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Switch ``model`` to eval mode; restore every module's train/eval flag and every parameter's
    ``requires_grad`` on exit, also when an exception is raised."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


class LayerCapture:
    """Forward hook on a target layer that records its output as the activation A.

    With ``cut_graph`` the hook re-enables autograd and hands the rest of the network a copy of a fresh
    leaf tensor, so a forward run under ``torch.no_grad()`` builds a graph only for the layers after the
    target: gradients dS/dA then cost about a no-grad forward. The copy keeps A intact when the next
    layer works in place (``ReLU(inplace=True)``). ``post`` (e.g. ReLU) is applied to the output first;
    it must be idempotent with what the model does next.
    """

    def __init__(self, layer: nn.Module, post: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 cut_graph: bool = True):
        self.layer, self.post, self.cut_graph = layer, post, cut_graph
        self.activation: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs, output):
        if self.activation is not None:
            raise RuntimeError("the target layer ran twice in one forward pass (a shared module?); "
                               "choose another with --target-layer")
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"the target layer returns {type(output).__name__}, not a tensor")
        act = self.post(output) if self.post is not None else output
        if not self.cut_graph:
            self.activation = act
            return act if self.post is not None else None
        torch.set_grad_enabled(True)  # the enclosing no_grad() restores the caller's mode on exit
        self.activation = act.detach().requires_grad_(True)
        return self.activation.clone()

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``model(x)``; layers before the target build no autograd graph when ``cut_graph``."""
        self.activation = None
        if self.cut_graph:
            with torch.no_grad():
                logits = model(x)
        else:
            logits = model(x)
        if self.activation is None:
            raise RuntimeError("the target layer did not run during the forward pass")
        return logits

    def __enter__(self) -> LayerCapture:
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
