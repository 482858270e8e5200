"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), as TorchRay 1.0.0.2's ``extremal_perturbation``
with its pointing-benchmark settings (preserve variant, blur perturbation, the target logit as reward).

For each image and each area a in ``areas`` a smooth mask m_a = G(p_a) in [0, 1] is found by gradient ascent
on the energy

    E(p_a) = Phi_k(perturb(x, m_a)) - lambda_t * mean((sort(vec m_a) - r_a)^2)

where Phi_k is the target logit, perturb blends a blur pyramid of x by the mask, r_a is the sorted reference
vector (a fraction 1 - a of zeros, then ones) and lambda_t = 300 * 1.0035^t. The raw map is sum_a m_a, each
mask Gaussian-smoothed, at the input size (TorchRay's benchmark sums the areas' masks the same way).

The B images and A areas run as one optimisation over B*A masks: every iteration scores all B*A perturbed
images in one batch. Every mask has its own parameters and momentum, and the energy is a sum over masks, so
a mask's gradient is its own (the model runs in eval mode): a batch equals its images one at a time.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from common.precision import full_precision
from methods.base import Explainer, Explanation
from methods.errors import MethodError
from methods.options import Option, choice, in_interval, non_negative_real, positive_int, positive_real
from methods.perturbation import SEED
from methods.targets import target_scores
from models.spec import ModelSpec

# TorchRay's constants of the optimisation (not options there either)
LEARNING_RATE = 0.01
MOMENTUM = 0.9  # SGD's momentum and dampening, both 0.9
REGUL_WEIGHT = 300.0  # lambda_0 of the area constraint
REGUL_GROWTH = 1.0035  # lambda_{t+1} = 1.0035 lambda_t
COLDNESS = 20.0  # the smooth max's softmax temperature
MAX_BLUR = 20.0  # sigma of the most blurred pyramid level
JITTERS = ("alternate", "random", "off")
# the area constraint sorts the mask's pixels, and the initial mask has many exactly equal values: which of
# them meet a 0 or a 1 of the reference decides their gradient. A stable sort breaks ties by pixel order on
# every device; torch.sort's default (TorchRay's) breaks them as the device's sort happens to (tests switch it
# off to reproduce TorchRay on a CPU exactly)
STABLE_SORT = True


def check_areas(name: str, values) -> tuple[float, ...]:
    """A non-empty sequence of mask areas, each in (0, 1)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise MethodError(f"{name} must be a non-empty sequence of numbers in (0, 1), got {values!r}")
    values = tuple(values)
    if not values:
        raise MethodError(f"{name} must be a non-empty sequence of numbers in (0, 1), got {values!r}")
    return tuple(in_interval(name, v, 0.0, 1.0, open_low=True, open_high=True) for v in values)


def check_levels(name: str, value) -> int:
    """An integer >= 2 (a pyramid needs the image and one blurred level)."""
    if positive_int(name, value) < 2:
        raise MethodError(f"{name} must be an integer >= 2, got {value!r}")
    return int(value)


AREAS = Option("areas", "--areas", (0.025, 0.05, 0.1, 0.2), check_areas,
               "mask areas a, one mask each, summed (TorchRay's VOC benchmark; COCO: 0.018 0.025 0.05 0.1)",
               type=float, nargs="+")
MAX_ITER = Option("max_iter", "--max-iter", 800, positive_int,
                  "gradient-ascent iterations per mask (the cost: one forward+backward of B*A images each)", type=int)
MASK_STEP = Option("step", "--mask-step", 7, positive_int, "pixels between mask parameters (TorchRay's step)",
                   type=int)
MASK_SIGMA = Option("sigma", "--mask-sigma", 21.0, positive_real,
                    "scale in pixels of the smooth max's kernel k(|u - c| / sigma) (TorchRay's sigma)", type=float)
BLUR_LEVELS = Option("num_levels", "--blur-levels", 8, check_levels,
                     "levels L of the blur pyramid, sigma_l = 20 (1 - l / (L - 1))", type=int)
MASK_SMOOTH = Option("smooth", "--mask-smooth", 0.09, non_negative_real,
                     "Gaussian smoothing of the final masks, sigma = smooth * min(H, W); 0: none", type=float)
JITTER = Option("jitter", "--jitter", "alternate", partial(choice, choices=JITTERS),
                "horizontal flips of the perturbed images: alternate (every even iteration, TorchRay's), "
                "random (each iteration with probability 1/2, drawn from --seed) or off")
EXTREMAL_OPTIONS = (AREAS, MAX_ITER, MASK_STEP, MASK_SIGMA, BLUR_LEVELS, MASK_SMOOTH, JITTER, SEED)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x convolved with a Gaussian of std ``sigma`` (2 ceil(4 sigma) + 1 taps, summing to 1), zeros outside,
    separably (rows, then columns); sigma 0 is x. The taps are computed in float64, then x's dtype."""
    half = math.ceil(4 * sigma)
    if half == 0:
        return x
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device="cpu")
    taps = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    taps = (taps / taps.sum()).to(device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(half, 0), groups=channels)
    return F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, half), groups=channels)


def blur_pyramid(x: torch.Tensor, levels: int) -> torch.Tensor:
    """(B, L, C, H, W): level l is x blurred with sigma_l = 20 (1 - l / (L - 1)); level L - 1 is x itself."""
    with torch.no_grad(), full_precision(x.device.type):
        return torch.stack([gaussian_blur(x, MAX_BLUR * (1 - level / (levels - 1))) for level in range(levels)],
                           dim=1)


def perturb(pyramid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The perturbed images (B*A, C, H, W) of B images' pyramids (B, L, C, H, W) and their (B*A, 1, H, W) masks
    (image-major): at each pixel the level m (L - 1), linearly interpolated between the two nearest levels
    (m = 1 keeps the pixel, m = 0 takes the most blurred one)."""
    batch, levels, channels, height, width = pyramid.shape
    areas = masks.shape[0] // batch
    level = masks.view(batch, areas, 1, 1, height, width) * (levels - 1)
    lower = level.floor()
    weight = level - lower  # the gradient reaches the mask through this fraction only
    lower = lower.long().expand(batch, areas, 1, channels, height, width)
    stack = pyramid[:, None].expand(batch, areas, levels, channels, height, width)
    below = torch.gather(stack, 2, lower)
    above = torch.gather(stack, 2, (lower + 1).clamp(max=levels - 1))
    return ((1 - weight) * below + weight * above).view(batch * areas, channels, height, width)


class SmoothMaskGenerator:
    """G: parameters p (K, 1, h, w), one per ``step`` pixels, -> smooth masks, TorchRay's ``MaskGenerator``.

    Parameter j sits at pixel ``margin + step * j`` of a mask that extends ``margin = sigma`` pixels beyond the
    image. A pixel u of cell i = floor(u / step) takes the smooth max (a softmax-weighted mean, coldness 20)
    of k(|u - c_j| / sigma) p_j over the (2R + 1)^2 parameters j around i, k(z) = exp(-2 max(z - 1/2, 0)^2),
    clamped to [0, 1]. The kernel values depend on u only through its offset inside its cell, so they are one
    (n, step, step) table shared by every cell.
    """

    def __init__(self, height: int, width: int, step: int, sigma: float, device: torch.device):
        self.size = (height, width)
        self.step, self.sigma = step, sigma
        self.margin = sigma
        self.padding = 1 + math.ceil((self.margin + sigma) / step)
        self.radius = 1 + math.ceil(sigma / step)
        self.shape_in = tuple(math.ceil(side / step) for side in self.size)  # p's (h, w)
        window = 2 * self.radius + 1
        self.cells = tuple(side + 2 * self.padding - window + 1 for side in self.shape_in)
        self.shape_out = tuple(step * cells - step + 1 for cells in self.cells)  # the mask with its margin
        # offset of pixel (a, b) of a cell from neighbour (ky, kx), computed exactly in float64
        neighbour = (torch.arange(window, dtype=torch.float64, device="cpu") - self.padding) * step + self.margin
        inside = torch.arange(step, dtype=torch.float64, device="cpu")
        offset = inside[None, :] - neighbour[:, None]  # (window, step): a - (margin + step (ky - padding))
        dy = offset[:, None, :, None].expand(window, window, step, step).float()
        dx = offset[None, :, None, :].expand(window, window, step, step).float()
        z = torch.sqrt(dy ** 2 + dx ** 2) / sigma
        kernel = torch.exp(-2 * ((z - 0.5).clamp(min=0) ** 2))
        self.kernel = kernel.reshape(window * window, step, step).to(device)  # (n, step, step)

    def __call__(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cropped (K, 1, H, W), full (K, 1, *shape_out)) masks of parameters (K, 1, h, w)."""
        count = params.shape[0]
        window = 2 * self.radius + 1
        rows, cols = self.cells
        step = self.step
        neighbours = F.unfold(params, (window, window), padding=self.padding).view(count, window * window, rows, cols)
        values = neighbours[:, :, :, None, :, None] * self.kernel[None, :, None, :, None, :]
        values = values.reshape(count, window * window, rows * step, cols * step)
        values = values[:, :, :self.shape_out[0], :self.shape_out[1]].contiguous()
        full = (values * torch.softmax(COLDNESS * values, dim=1)).sum(dim=1, keepdim=True).clamp(0, 1)
        top = round(self.margin)
        return full[:, :, top:top + self.size[0], top:top + self.size[1]], full


class ExtremalPerturbation(Explainer):
    """Extremal perturbations, preserve variant: sum_a m_a over the areas (see the module docstring).

    As TorchRay: p starts at ones; SGD with learning rate 0.01, momentum and dampening 0.9 ascends E, p is
    clamped to [0, 1] after each step; the mask returned is the one of the last iteration's forward, so
    ``max_iter`` iterations cost max_iter - 1 forward+backward passes here (TorchRay's last update is unused).
    """

    name = "extremal"

    def __init__(self, model: nn.Module, areas=AREAS.default, max_iter: int = MAX_ITER.default,
                 step: int = MASK_STEP.default, sigma: float = MASK_SIGMA.default,
                 num_levels: int = BLUR_LEVELS.default, smooth: float = MASK_SMOOTH.default,
                 jitter: str = JITTER.default, seed: int = SEED.default):
        super().__init__(model)
        self.areas = AREAS.validate(areas)
        self.max_iter = MAX_ITER.validate(max_iter)
        self.step = MASK_STEP.validate(step)
        self.sigma = MASK_SIGMA.validate(sigma)
        self.num_levels = BLUR_LEVELS.validate(num_levels)
        self.smooth = MASK_SMOOTH.validate(smooth)
        self.jitter = JITTER.validate(jitter)
        self.seed = SEED.validate(seed)
        self._generators: dict = {}

    def generator(self, height: int, width: int, device: torch.device) -> SmoothMaskGenerator:
        """The mask generator G for an H x W input, cached per size and device."""
        key = (height, width, torch.device(device))
        if key not in self._generators:
            self._generators[key] = SmoothMaskGenerator(height, width, self.step, self.sigma, device)
        return self._generators[key]

    def flips(self) -> list[bool]:
        """Whether iteration t flips the perturbed images, for every t, decided before the loop (a seeded
        CPU generator for 'random': the same flips on every device)."""
        if self.jitter == "alternate":
            return [t % 2 == 0 for t in range(self.max_iter)]
        if self.jitter == "off":
            return [False] * self.max_iter
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return (torch.rand(self.max_iter, generator=generator, device="cpu") < 0.5).tolist()

    def reference(self, cells: int, device: torch.device) -> torch.Tensor:
        """r (A, N): per area a, the first int(N (1 - a)) of N = mask pixels are 0, the rest 1."""
        zeros = torch.tensor([int(cells * (1 - area)) for area in self.areas], device=device)
        return (torch.arange(cells, device=device)[None] >= zeros[:, None]).float()

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        batch, _, height, width = x.shape
        areas = len(self.areas)
        with torch.no_grad():
            logits = self.model(x)
        x = x.detach()
        generator = self.generator(height, width, x.device)
        pyramid = blur_pyramid(x, self.num_levels)
        reference = self.reference(math.prod(generator.shape_out), x.device).repeat(batch, 1)  # (B*A, N)
        mask_targets = targets.repeat_interleave(areas)
        params = torch.ones(batch * areas, 1, *generator.shape_in, device=x.device)
        velocity = None
        weight = REGUL_WEIGHT
        for flip in self.flips()[:-1]:  # the last iteration's update is never used (see the class docstring)
            leaf = params.detach().requires_grad_(True)
            with torch.enable_grad():
                masks, full = generator(leaf)
                images = perturb(pyramid, masks.to(x.dtype))
                if flip:
                    images = images.flip(3)
                reward = target_scores(self.model(images), mask_targets).float()
                ranked = full.flatten(1).sort(dim=1, stable=STABLE_SORT).values
                area_cost = ((ranked - reference) ** 2).mean(dim=1) * weight
                (grad,) = torch.autograd.grad(-(reward - area_cost).sum(), leaf)
            # SGD with momentum and dampening 0.9 (PyTorch's rule: the first step's velocity is the gradient)
            velocity = grad if velocity is None else velocity.mul_(MOMENTUM).add_(grad, alpha=1 - MOMENTUM)
            params = params.add(velocity, alpha=-LEARNING_RATE).clamp_(0, 1)
            weight *= REGUL_GROWTH
        with torch.no_grad():
            masks, _ = generator(params)
            if self.smooth > 0:
                with full_precision(x.device.type):
                    masks = gaussian_blur(masks, self.smooth * min(height, width))
            maps = masks.view(batch, areas, height, width).sum(dim=1, keepdim=True)
        return Explanation(maps, logits.detach())

    def __repr__(self) -> str:
        return (f"ExtremalPerturbation(areas={list(self.areas)}, max_iter={self.max_iter}, step={self.step}, "
                f"sigma={self.sigma}, num_levels={self.num_levels}, smooth={self.smooth}, jitter={self.jitter!r}, "
                f"seed={self.seed})")


def build_extremal(spec: ModelSpec, **options) -> Explainer:
    """Extremal perturbations; options: areas, max_iter, step, sigma, num_levels, smooth, jitter, seed."""
    return ExtremalPerturbation(spec.model, **options)
