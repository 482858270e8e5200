"""Finding the CAM target layer: the last module with a spatial 4-D output before global pooling."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from models.errors import ModelError
from models.tokens import TokenLayout

POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with a one-line error that suggests names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        tops = ", ".join(n for n, _ in model.named_children())
        raise ModelError(f"target layer '{name}' not found in the model (top-level modules: {tops})") from None


def blank_forward(model: nn.Module, input_size: tuple[int, int]) -> None:
    """One eval-mode forward of a black image (the model's train/eval mode is restored)."""
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        dtype = parameter.dtype if parameter.is_floating_point() else None
        model(torch.zeros(1, 3, *input_size, device=parameter.device, dtype=dtype))
    finally:
        model.train(was_training)


@torch.no_grad()
def check_spatial_layer(model: nn.Module, name: str, input_size: tuple[int, int],
                        layout: TokenLayout | None = None) -> None:
    """A CAM layer must give a (B, C, h, w) output, directly or through the model's token ``layout``: one
    forward of a blank image checks ``name``'s output."""
    layer = get_layer(model, name)
    outputs = []
    with layout.watch() if layout is not None else nullcontext():
        handle = layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            blank_forward(model, input_size)
        finally:
            handle.remove()
        if not outputs:
            raise ModelError(f"target layer '{name}' does not run in the model's forward pass")
        output = outputs[-1]
        if layout is not None:
            try:
                output = layout.to_spatial(output) if isinstance(output, torch.Tensor) else output
            except RuntimeError as exc:
                raise ModelError(f"target layer '{name}' does not hold the model's {layout.layout} layout: "
                                 f"{exc}") from None
    if not (isinstance(output, torch.Tensor) and output.dim() == 4):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(f"target layer '{name}' gives output {shape}, not a spatial (B, C, h, w) map; "
                         f"name a convolutional layer or block")


@torch.no_grad()
def find_target_layer(model: nn.Module, input_size: tuple[int, int]) -> str:
    """Name of the last non-pooling module whose output is (B, C, h, w) with h*w > 1.

    The outermost of the enclosing modules that finish right after it (a residual block and its stage, an
    Inception block that concatenates its branches) is chosen, as long as their output is still spatial.
    """
    records: list[tuple[str, torch.Tensor, nn.Module]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: records.append((name, o, m)))
        for name, module in model.named_modules() if name
    ]
    try:
        blank_forward(model, input_size)
    finally:
        for handle in handles:
            handle.remove()
    for index in range(len(records) - 1, -1, -1):
        name, output, module = records[index]
        spatial = isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1
        is_leaf = next(module.children(), None) is None
        if spatial and is_leaf and not isinstance(module, POOLING):
            best = name
            for later_name, later_output, _ in records[index + 1:]:
                encloses = best.startswith(later_name + ".")
                if not (encloses and isinstance(later_output, torch.Tensor) and later_output.dim() == 4
                        and later_output.shape[-1] * later_output.shape[-2] > 1):
                    break
                best = later_name
            return best
    raise ModelError("could not find a convolutional target layer automatically; pass --target-layer NAME")
