"""Token layouts: a transformer layer's output seen as a (B, C, h, w) map, and the map turned back.

CAM methods need a spatial activation A (B, C, h, w). A ViT block gives tokens (B, N, D): ``num_prefix``
leading tokens (class, distillation and register tokens) then the h*w patch tokens row by row; a Swin
stage gives (B, h, w, C). A layout maps such an output to A (:meth:`TokenLayout.to_spatial`) and A back
to an output the network continues from (:meth:`TokenLayout.to_output`), so that a capture can make A
the leaf of the graph: the gradients dS/dA are then exactly dS/d(patch tokens), rearranged.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TokenLayout(ABC):
    """How a layer's output holds a spatial map. ``layout`` names it ('tokens', 'nhwc')."""

    layout = ""

    @abstractmethod
    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        """The layer output as a (B, C, h, w) map (a view where possible)."""

    @abstractmethod
    def to_output(self, spatial: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A new tensor shaped like ``output`` whose spatial part is computed from ``spatial`` (never a view of
        it); ``output`` supplies what the map does not hold (prefix tokens)."""

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Hooks the layout needs while the model runs (none by default), removed on exit."""
        yield

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


def feature_grid(patch_embed: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (h, w) a patch embedding gives for an (H, W) input: its own ``dynamic_feat_size`` (timm,
    with or without padding) or the floor of H / patch, W / patch (patch: ``patch_size``, or the kernel of a
    convolution such as torchvision ViT's ``conv_proj``)."""
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(v) for v in patch_embed.dynamic_feat_size(tuple(input_size)))
    patch = getattr(patch_embed, "patch_size", None) or patch_embed.kernel_size  # torchvision: a Conv2d
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return input_size[0] // ph, input_size[1] // pw


class PatchTokens(TokenLayout):
    """ViT/DeiT tokens (B, N, D) = ``num_prefix`` prefix tokens + h*w patch tokens, row-major.

    The grid (h, w) is read at run time from the input of ``patch_embed`` (a forward pre-hook active within
    :meth:`watch`), so any input size and aspect ratio works; the prefix tokens are dropped from the map
    and put back unchanged by :meth:`to_output`.
    """

    layout = "tokens"

    def __init__(self, patch_embed: nn.Module, num_prefix: int):
        self.patch_embed = patch_embed
        self.num_prefix = int(num_prefix)
        self.grid: tuple[int, int] | None = None  # of the last input seen within watch()

    @contextmanager
    def watch(self) -> Iterator[None]:
        def record(module, args):
            self.grid = feature_grid(module, tuple(args[0].shape[-2:]))

        handle = self.patch_embed.register_forward_pre_hook(record)
        try:
            yield
        finally:
            handle.remove()

    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 3:
            raise RuntimeError(f"expected tokens (B, N, D), got shape {tuple(output.shape)}")
        if self.grid is None:
            raise RuntimeError("the patch grid is unknown: the patch embedding has not run within watch()")
        h, w = self.grid
        if output.shape[1] != self.num_prefix + h * w:
            raise RuntimeError(f"got {output.shape[1]} tokens; {self.num_prefix} prefix tokens and a {h}x{w} "
                               f"patch grid make {self.num_prefix + h * w}")
        return output[:, self.num_prefix:].transpose(1, 2).unflatten(2, (h, w))

    def to_output(self, spatial: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        patches = spatial.flatten(2).transpose(1, 2).to(output.dtype)
        return torch.cat([output[:, :self.num_prefix], patches], dim=1)

    def __repr__(self) -> str:
        return f"PatchTokens(num_prefix={self.num_prefix})"


class ChannelsLastMap(TokenLayout):
    """Swin stage outputs (B, h, w, C)."""

    layout = "nhwc"

    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 4:
            raise RuntimeError(f"expected a (B, h, w, C) map, got shape {tuple(output.shape)}")
        return output.permute(0, 3, 1, 2)

    def to_output(self, spatial: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return spatial.permute(0, 2, 3, 1).to(output.dtype).clone(memory_format=torch.contiguous_format)
