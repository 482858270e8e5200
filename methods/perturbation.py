"""Perturbation explainers: Score-CAM and RISE score masked copies of the input, no gradients.

Both run every masked image through the model once, in chunks of ``mask_batch`` images taken from the
flattened (image, mask) pairs of the whole batch, and keep only the target class's probability
P_k = softmax(f(x * M))_k (sigmoid(f(x * M)_k) for multi-label models).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from methods.base import Explainer, Explanation
from methods.batching import MASK_BATCH, batch_for_memory, run_chunks
from methods.hooks import LayerCapture, Post
from methods.options import Option, in_interval, integer, positive_int
from methods.targets import target_probabilities
from models.spec import ModelSpec


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, leave=False, disable=None)


class ScoreCAM(Explainer):
    """Score-CAM (Wang et al., CVPR-W 2020): L = sum_c s_c A_c at the resolution of A.

    Each channel A_c of the target-layer activation is upsampled (bilinear) to the input size and min-max
    normalised to a mask H_c in [0, 1]; s_c = P_k(x * H_c), the target's probability, as the official
    code (no baseline subtraction, no softmax over channels). A constant channel (max = min) is skipped
    (s_c = 0) as in the official code, which also saves its forward pass.
    """

    name = "scorecam"

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post | None = None,
                 mask_batch: int | None = MASK_BATCH.default, multilabel: bool = False):
        super().__init__(model)
        self.layer, self.activation_post = layer, activation_post
        self.mask_batch = MASK_BATCH.validate(mask_batch)  # None: from free memory
        self.multilabel = multilabel

    @torch.no_grad()
    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        batch, _, height, width = x.shape
        # no graph (no gradients here); the capture keeps A intact past in-place ops
        with LayerCapture(self.layer, self.activation_post, cut_graph=False) as capture:
            logits = capture.forward(self.model, x)
        activations = capture.activation.detach()             # (B, C, h, w)
        channels = activations.shape[1]
        flat = activations.flatten(0, 1)[:, None]              # (B*C, 1, h, w)
        varying = flat.amax(dim=(1, 2, 3)) > flat.amin(dim=(1, 2, 3))
        pairs = varying.nonzero().squeeze(1)                   # (image, channel) pairs to score
        scores = torch.zeros(batch * channels, device=x.device)
        mask_batch = self.mask_batch or batch_for_memory(self.model, (height, width), x.device, gradients=False)

        def score(start: int, stop: int) -> None:
            index = pairs[start:stop]
            image = torch.div(index, channels, rounding_mode="floor")
            masks = F.interpolate(flat[index], size=(height, width), mode="bilinear", align_corners=False)
            low = masks.amin(dim=(2, 3), keepdim=True)
            span = masks.amax(dim=(2, 3), keepdim=True) - low
            masks = torch.where(span > 0, (masks - low) / span.clamp(min=torch.finfo(span.dtype).tiny), 0)
            scores[index] = target_probabilities(self.model(x[image] * masks.to(x.dtype)), targets[image],
                                               self.multilabel)

        with _bar(len(pairs), "Score-CAM masks") as bar:
            run_chunks(len(pairs), mask_batch, score, self.model, ("forward", (height, width), str(x.device)),
                       "Score-CAM masked images", bar.update)
        weights = scores.view(batch, channels, 1, 1)
        return Explanation((weights * activations.float()).sum(dim=1, keepdim=True), logits.detach())

    def __repr__(self) -> str:
        return f"ScoreCAM(mask_batch={self.mask_batch})"


def mirror_interpolation(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix of 1-D linear interpolation with pixel-centre alignment and mirror
    boundary (skimage ``resize(order=1, mode='reflect')``, the official RISE upsampling). Built on the CPU in
    float64 (not every device has it); the caller moves the float32 result."""
    coords = (torch.arange(out_size, dtype=torch.float64, device="cpu") + 0.5) * in_size / out_size - 0.5
    low = coords.floor()
    frac = coords - low
    low = low.long()
    period = 2 * (in_size - 1)

    def mirror(index):
        if period == 0:
            return torch.zeros_like(index)
        index = index.abs() % period
        return torch.where(index >= in_size, period - index, index)

    matrix = torch.zeros(out_size, in_size, dtype=torch.float64, device="cpu")
    rows = torch.arange(out_size, device="cpu")
    matrix.index_put_((rows, mirror(low)), 1 - frac, accumulate=True)
    matrix.index_put_((rows, mirror(low + 1)), frac, accumulate=True)
    return matrix.float()


N_MASKS = Option("n_masks", "--masks", 4000, positive_int, "number of random masks N", type=int)
CELL = Option("cell", "--cell", 7, positive_int, "mask grid s x s", type=int)
KEEP_PROB = Option("p", "--keep-prob", 0.5, partial(in_interval, low=0.0, high=1.0, open_low=True),
                   "probability p a cell is kept", type=float)
SEED = Option("seed", "--seed", 0, integer, "random seed (rise: its masks; extremal: the flips of --jitter random)",
              type=int)
RISE_OPTIONS = (N_MASKS, CELL, KEEP_PROB, SEED, MASK_BATCH)
SCORECAM_OPTIONS = (MASK_BATCH,)


class RISE(Explainer):
    """RISE (Petsiuk et al., BMVC 2018): S_k = sum_i P_k(x * M_i) M_i / (N p), at the input size.

    N masks: binary s x s grids with P(1) = p, bilinearly upsampled to (s + 1) * ceil(H / s) by
    (s + 1) * ceil(W / s) and cropped to H x W at a random shift in [0, ceil(H / s)) x [0, ceil(W / s)),
    as the official code (including its mirror boundary). The grids and shifts are drawn from a
    ``torch.Generator`` seeded with ``seed`` and cached per (H, W, device) in factored form
    M_i = R_i G_i C_i^T, so memory is O(N (s^2 + 1)) and masks are built per chunk (:meth:`masks`).
    """

    name = "rise"

    def __init__(self, model: nn.Module, n_masks: int = N_MASKS.default, cell: int = CELL.default,
                 p: float = KEEP_PROB.default, seed: int = SEED.default, mask_batch: int | None = MASK_BATCH.default,
                 multilabel: bool = False):
        super().__init__(model)
        self.n_masks = N_MASKS.validate(n_masks)
        self.cell = CELL.validate(cell)
        self.p = KEEP_PROB.validate(p)  # the keep probability
        self.seed = SEED.validate(seed)
        self.mask_batch = MASK_BATCH.validate(mask_batch)  # None: from free memory
        self.multilabel = multilabel
        self._cache: dict = {}

    def _factors(self, height: int, width: int, device: torch.device):
        """Cached (grids (N, s, s), row shifts (N,), column shifts (N,), row and column interpolation)."""
        key = (height, width, torch.device(device))
        if key not in self._cache:
            s, n = self.cell, self.n_masks
            cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
            # drawn on the CPU from a CPU generator, so a seed gives the same masks on every device; moved once
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            grids = (torch.rand(n, s, s, generator=generator, device="cpu") < self.p).float()
            shift_h = torch.randint(0, cell_h, (n,), generator=generator, device="cpu")
            shift_w = torch.randint(0, cell_w, (n,), generator=generator, device="cpu")
            rows = mirror_interpolation(s, (s + 1) * cell_h)
            cols = mirror_interpolation(s, (s + 1) * cell_w)
            self._cache[key] = tuple(t.to(device) for t in (grids, shift_h, shift_w, rows, cols))
        return self._cache[key]

    def masks(self, height: int, width: int, device: torch.device | str = "cpu",
              index: torch.Tensor | None = None) -> torch.Tensor:
        """Masks M_i (n, H, W) in [0, 1] for ``index`` (default: all N)."""
        grids, shift_h, shift_w, rows, cols = self._factors(height, width, device)
        if index is None:
            index = torch.arange(self.n_masks, device=grids.device)
        row_idx = shift_h[index, None] + torch.arange(height, device=grids.device)
        col_idx = shift_w[index, None] + torch.arange(width, device=grids.device)
        return rows[row_idx] @ grids[index] @ cols[col_idx].transpose(1, 2)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        batch, _, height, width = x.shape
        n = self.n_masks
        saliency = torch.zeros(batch, height * width, device=x.device)
        logits = self.model(x)
        pairs = torch.arange(batch * n, device=x.device)      # image-major (image, mask) pairs
        mask_batch = self.mask_batch or batch_for_memory(self.model, (height, width), x.device, gradients=False)

        def score(start: int, stop: int) -> None:  # the sum is added only once a chunk's forward is done
            index = pairs[start:stop]
            image = torch.div(index, n, rounding_mode="floor")
            masks = self.masks(height, width, x.device, index - image * n)
            probs = target_probabilities(self.model(x[image] * masks[:, None].to(x.dtype)), targets[image],
                                       self.multilabel)
            weights = torch.zeros(batch, len(index), device=x.device)
            weights[image, torch.arange(len(index), device=x.device)] = probs
            saliency.add_(weights @ masks.flatten(1))

        with _bar(batch * n, "RISE masks") as bar:
            run_chunks(batch * n, mask_batch, score, self.model, ("forward", (height, width), str(x.device)),
                       "RISE masked images", bar.update)
        maps = (saliency / (n * self.p)).view(batch, 1, height, width)
        return Explanation(maps, logits.detach())

    def __repr__(self) -> str:
        return f"RISE(n_masks={self.n_masks}, cell={self.cell}, p={self.p}, seed={self.seed})"


def build_scorecam(spec: ModelSpec, **options) -> Explainer:
    """Score-CAM at the spec's target layer; options: mask_batch."""
    return ScoreCAM(spec.model, spec.layer, spec.activation_post, multilabel=spec.multilabel, **options)


def build_rise(spec: ModelSpec, **options) -> Explainer:
    """RISE; options: n_masks, cell, p, seed, mask_batch."""
    return RISE(spec.model, multilabel=spec.multilabel, **options)
