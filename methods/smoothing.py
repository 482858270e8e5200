"""Smoothing wrappers that compose with UCAG: ``UCAG(Smooth(method))`` smooths every crop's map,
``Smooth(UCAG(method))`` averages UCAG maps of noisy images.

:class:`NoiseSmooth` (SmoothGrad, Smilkov et al. 2017): the mean of the method's maps over N copies of the
image with Gaussian noise, sigma = SIGMA x (max - min of the image) (the paper's noise level, relative to the
input's range). The N noise fields are drawn once per input size on the CPU from a generator seeded with
``seed`` and shared by every image of a batch, so an image's map is the same in any batch, at any batch size
and on any device. The noisy copies (N x B) go through the method in chunks that fit the device's memory.

:class:`FlipScaleSmooth` (test-time augmentation): the mean of the method's maps over flipped and rescaled
copies of the image, each map mapped back (flipped back; resized to the map size of the unscaled image).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from methods.base import Explainer, Explanation, Wrapper
from methods.batching import batch_for_memory, even_chunks, run_chunks
from methods.errors import MethodError

FLIPS = {"none": ((),), "h": ((), (3,)), "hv": ((), (3,), (2,), (2, 3))}  # flip dims of each copy


class _Wrapper(Wrapper):
    """A smoothing wrapper: also the inner explainer's model layout and final maps."""

    @property
    def memory_format(self) -> str:
        return self.explainer.memory_format

    def finalize(self, maps: torch.Tensor, size: tuple[int, int] | None = None, antialias: bool = True) -> torch.Tensor:
        return self.explainer.finalize(maps, size, antialias)

    def finalize_signed(self, maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.explainer.finalize_signed(maps, size)


class NoiseSmooth(_Wrapper):
    """SmoothGrad over any explainer: N noisy copies (samples), noise level sigma (SIGMA, relative to the
    image's range), seeded noise (seed); sample_batch: noisy images per call of the inner explainer (None:
    from free memory)."""

    name = "smooth"

    def __init__(self, explainer: Explainer, samples: int, sigma: float, seed: int = 0,
                 sample_batch: int | None = None):
        super().__init__(explainer)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise MethodError(f"smoothing samples must be a positive integer, got {samples!r}")
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and 0 <= sigma < float("inf")):
            raise MethodError(f"smoothing sigma must be a finite number >= 0, got {sigma!r}")
        self.samples, self.sigma, self.seed, self.sample_batch = samples, float(sigma), seed, sample_batch
        self._noise: dict[tuple[int, ...], torch.Tensor] = {}

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(N, C, H, W) standard normal fields for images of ``shape`` (C, H, W), drawn on the CPU once."""
        if shape not in self._noise:
            generator = torch.Generator().manual_seed(self.seed)
            self._noise[shape] = torch.randn((self.samples, *shape), generator=generator)
        return self._noise[shape]

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        if self.sigma == 0 and self.samples == 1:  # no noise: the method itself
            return self.explainer.explain_resolved(x, targets)
        batch = x.shape[0]
        logits = self.predict(x)  # x's logits, the contract's (no graph)
        spread = (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).view(1, batch, 1, 1, 1)
        fields = self.noise(tuple(x.shape[1:])).to(x.device, x.dtype)
        total = self.samples * batch  # sample-major: copy j = (sample j // B, image j % B)
        sample_targets = targets.repeat(self.samples)
        chunk = self.sample_batch or even_chunks(total, batch_for_memory(self.model, tuple(x.shape[-2:]), x.device,
                                                                         gradients=True))
        summed: list[torch.Tensor] = []

        def explain_chunk(start: int, stop: int) -> None:
            index = torch.arange(start, stop, device=x.device)
            noisy = x[index % batch] + self.sigma * spread.view(-1)[index % batch].view(-1, 1, 1, 1) * \
                fields[index // batch]
            maps = self.explainer.explain_resolved(noisy, sample_targets[start:stop]).maps.float()
            summed.append(maps)

        run_chunks(total, chunk, explain_chunk, self.model, ("smooth", self.explainer.name, tuple(x.shape[-2:]),
                                                              str(x.device)), "noisy copies")
        maps = torch.cat(summed).view(self.samples, batch, *summed[0].shape[1:]).mean(dim=0)
        return Explanation(maps, logits)

    def __repr__(self) -> str:
        return f"NoiseSmooth({self.explainer!r}, samples={self.samples}, sigma={self.sigma}, seed={self.seed})"


class FlipScaleSmooth(_Wrapper):
    """Test-time augmentation: the mean map over the flips (FLIPS: none, h, hv) x the scales (input resized by
    s, bicubic), each map flipped back and resized to the map size of the unscaled image."""

    name = "tta"

    def __init__(self, explainer: Explainer, flips: str = "h", scales: Sequence[float] = (1.0,)):
        super().__init__(explainer)
        if flips not in FLIPS:
            raise MethodError(f"tta flips must be one of {', '.join(FLIPS)}, got {flips!r}")
        scales = tuple(scales)
        if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < float("inf")
                                 for s in scales):
            raise MethodError(f"tta scales must be finite numbers > 0, got {list(scales)}")
        self.flips, self.scales = flips, tuple(float(s) for s in scales)

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        height, width = x.shape[-2:]
        logits = self.predict(x)  # x's logits, the contract's (no graph)
        total, size, count = None, None, 0
        for scale in sorted(self.scales, key=lambda s: s != 1.0):  # scale 1 first: its map size is the size
            scaled = x if scale == 1.0 else F.interpolate(x, size=(max(1, round(height * scale)),
                                                                   max(1, round(width * scale))),
                                                           mode="bicubic", align_corners=False)
            for dims in FLIPS[self.flips]:
                flipped = scaled.flip(dims) if dims else scaled
                maps = self.explainer.explain_resolved(flipped, targets).maps.float()
                maps = maps.flip(dims) if dims else maps
                if size is None:
                    size = tuple(maps.shape[-2:]) if scale == 1.0 else self._base_size(x, targets)
                if tuple(maps.shape[-2:]) != size:
                    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
                total = maps if total is None else total + maps
                count += 1
        return Explanation(total / count, logits)

    def _base_size(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        """The map size of the unscaled image (one explanation of its first image)."""
        return tuple(self.explainer.explain_resolved(x[:1], targets[:1]).maps.shape[-2:])

    def __repr__(self) -> str:
        return f"FlipScaleSmooth({self.explainer!r}, flips={self.flips!r}, scales={list(self.scales)})"


def parse_smooth(text: str) -> tuple[str, tuple]:
    """'noise:N,SIGMA' -> ('noise', (N, SIGMA)); 'tta:FLIPS,S1/S2/...' -> ('tta', (FLIPS, (S1, S2, ...))).
    A MethodError names what is wrong."""
    kind, _, rest = text.partition(":")
    parts = rest.split(",")
    try:
        if kind == "noise" and len(parts) == 2:
            return "noise", (int(parts[0]), float(parts[1]))
        if kind == "tta" and len(parts) == 2:
            return "tta", (parts[0], tuple(float(s) for s in parts[1].split("/")))
        problem = "not of either form"
    except ValueError as exc:
        problem = str(exc)
    raise MethodError(f"--smooth must be noise:N,SIGMA (e.g. noise:16,0.15) or tta:FLIPS,SCALES (FLIPS one of "
                      f"{', '.join(FLIPS)}; SCALES like 1/1.25), got {text!r} ({problem})")


def smoothed(explainer: Explainer, text: str, seed: int = 0) -> Explainer:
    """The explainer wrapped as ``text`` (:func:`parse_smooth`) says."""
    kind, values = parse_smooth(text)
    if kind == "noise":
        return NoiseSmooth(explainer, values[0], values[1], seed)
    return FlipScaleSmooth(explainer, values[0], values[1])
