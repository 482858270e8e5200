"""Context managers that touch a model and always put it back: state restore and activation capture."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from models.tokens import TokenLayout

Post = Callable[[torch.Tensor], torch.Tensor] | TokenLayout


@contextmanager
def restored_state(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Switch ``model`` to eval mode; restore every module's train/eval flag and every parameter's
    ``requires_grad`` on exit, also when an exception is raised."""
    modules = list(model.modules())
    modes = [module.training for module in modules]
    # the parameters from the same walk (a shared parameter twice: restored to the same flag)
    params = [param for module in modules for param in module._parameters.values() if param is not None]
    flags = [param.requires_grad for param in params]
    try:
        if eval_mode:
            for module in modules:  # model.eval(), writing only the flags that change (a model in eval: none)
                if module.training:
                    module.training = False
        yield model
    finally:  # only changed flags are written back: nn.Module's __setattr__ and requires_grad_ cost a call each
        for module, training in zip(modules, modes, strict=True):
            if module.training != training:
                module.training = training
        for param, requires_grad in zip(params, flags, strict=True):
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)


@contextmanager
def swapped_forwards(forwards: Iterable[tuple[nn.Module, Callable]]) -> Iterator[list[nn.Module]]:
    """Within the block each module of ``forwards`` runs the ``forward`` paired with it (set on the instance);
    the instances' own ``forward`` attributes (or their absence) are put back on exit, also after an exception.
    Yields the modules."""
    swapped: list[tuple[nn.Module, bool, object]] = []
    try:
        for module, forward in forwards:
            swapped.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = forward
        yield [module for module, _, _ in swapped]
    finally:
        for module, own, previous in reversed(swapped):
            if own:
                module.forward = previous
            else:
                del module.forward


class LayerCapture:
    """Forward hooks recording the outputs of one or several layers in one forward pass (the activations
    A), removed on exit. The one capture every method that hooks layers uses.

    layers: one module, or a mapping name -> module (the names order nothing; they word the errors and key
    :attr:`activations`). post: an op applied to each output before it is recorded (DenseNet's final ReLU),
    or a mapping name -> op for some of the layers; it must be idempotent with what the model does next.
    A post may instead be a :class:`models.tokens.TokenLayout` (transformer layers): the recorded A is then
    its (B, C, h, w) map of the output, and the network continues from ``to_output(A)``, so dS/dA is the
    gradient of the patch tokens, rearranged; the layout's :meth:`~models.tokens.TokenLayout.watch` hooks
    are active while the capture is.
    Every recorded layer hands the rest of the network a copy, so an in-place op after it
    (``ReLU(inplace=True)``) leaves the recorded tensor, and its gradient, those of the layer's output.

    cut_graph: :meth:`forward` runs the model under ``torch.no_grad()``; the first recorded output becomes a
    fresh leaf with autograd re-enabled from there on, so only the layers after it build a graph and the
    gradients dS/dA cost about a no-grad forward. Deeper recorded outputs that require grad stay in that
    graph; one that does not (off the first one's path, parameters frozen as SISE does) becomes a leaf of
    its own. Without it the caller's grad mode is kept: gradients reach the input (FullGrad), or no graph
    is built at all (Score-CAM under ``no_grad``).

    each_call: record every call (a module that runs twice is recorded twice) and let layers not run
    (FullGrad's bias layers); otherwise each layer must run exactly once per forward.
    """

    def __init__(self, layers: nn.Module | Mapping[str, nn.Module], post: Post | Mapping[str, Post] | None = None,
                 cut_graph: bool = True, each_call: bool = False):
        self.single = isinstance(layers, nn.Module)
        self.layers = {"": layers} if self.single else dict(layers)
        self.posts = dict(post) if isinstance(post, Mapping) else {name: post for name in self.layers}
        self.cut_graph, self.each_call = cut_graph, each_call
        self.records: list[tuple[str, torch.Tensor]] = []
        self._handles: list = []
        self._watches = ExitStack()

    @property
    def activation(self) -> torch.Tensor | None:
        """The last recorded output (the single layer's A)."""
        return self.records[-1][1] if self.records else None

    @property
    def activations(self) -> dict[str, torch.Tensor]:
        """name -> recorded output, in execution order."""
        return dict(self.records)

    def _label(self, name: str) -> str:
        return "the target layer" if self.single else f"layer '{name}'"

    def _hook(self, name: str):
        post = self.posts.get(name)

        def hook(module: nn.Module, inputs, output):
            if not self.each_call and any(seen == name for seen, _ in self.records):
                hint = "choose another with --target-layer" if self.single else "choose other layers"
                raise RuntimeError(f"{self._label(name)} ran twice in one forward pass (a shared module?); {hint}")
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(f"{self._label(name)} returns {type(output).__name__}, not a tensor")
            layout = post if isinstance(post, TokenLayout) else None
            if layout is not None:
                act = layout.to_spatial(output)
            else:
                act = post(output) if post is not None else output
            if self.cut_graph and not act.requires_grad:
                torch.set_grad_enabled(True)  # the no_grad() of forward() restores the caller's mode on exit
                act = act.detach().requires_grad_(True)
            self.records.append((name, act))
            return layout.to_output(act, output) if layout is not None else act.clone()
        return hook

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``model(x)``, recording the layers' outputs; layers before the first build no autograd graph
        when ``cut_graph``."""
        self.records = []
        if self.cut_graph:
            with torch.no_grad():
                logits = model(x)
        else:
            logits = model(x)
        if not self.each_call:
            seen = {name for name, _ in self.records}
            missing = [name for name in self.layers if name not in seen]
            if missing:
                where = "the target layer" if self.single else f"layers {', '.join(missing)}"
                raise RuntimeError(f"{where} did not run during the forward pass")
        return logits

    def __enter__(self) -> LayerCapture:
        try:
            layouts = {id(post): post for post in self.posts.values() if isinstance(post, TokenLayout)}
            for layout in layouts.values():
                self._watches.enter_context(layout.watch())
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._watches.close()
