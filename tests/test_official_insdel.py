"""--official insertion/deletion against literal transcriptions of the official code (KU-HJH/UCAG): its pixel
order (``np.flip(np.argsort(map))``, NumPy's unstable sort reversed), its CausalMetric.evaluate loop and AUC,
and the raw signed branch its ``ucag()`` takes for relevance methods (no ReLU, min-max or blur)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.datasets import Sample
from evaluation.image_metric import ImageMetricTask
from evaluation.insertion_deletion import game_curves, insertion_substrate, saliency_order
from evaluation.reports import write_insdel_report
from evaluation.rows import Row
from insdel import games
from methods.base import Explainer, Explanation
from models.spec import ModelSpec
from ucag import UCAG, UpscaledInput

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- transcriptions of the official code (written from its insdel.py and unfold_and_conquer.py) ---------------

def official_order(mask: np.ndarray) -> np.ndarray:
    """insdel.py: ``salient_order = np.flip(np.argsort(mask.reshape(b, HW), axis=1), axis=-1)``."""
    b = mask.shape[0]
    return np.flip(np.argsort(mask.reshape(b, -1), axis=1), axis=-1)


def official_auc(arr: np.ndarray) -> float:
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


def official_evaluate(model, img: torch.Tensor, mask: np.ndarray, cls_idx: torch.Tensor, mode: str,
                      step: int) -> np.ndarray:
    """CausalMetric.evaluate, one step at a time on the host: score the batch, then copy the next ``step``
    pixels (all channels) of every image from ``finish`` into ``start``. Substrates as its main(): zeros for
    deletion, the 51 x 51 sigma-50 blur for insertion (here our blur, checked against torchvision's in
    test_insertion_deletion.py: the substrate is not what this test is about)."""
    substrate = torch.zeros_like if mode == "del" else insertion_substrate
    b, _, height, width = img.shape
    hw = height * width
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = img.clone(), substrate(img)
    else:
        start, finish = substrate(img), img.clone()
    start, finish = start.numpy().copy(), finish.numpy()
    scores = np.empty((b, n_steps + 1), dtype="float32")
    salient_order = official_order(mask)
    for i in range(n_steps + 1):
        with torch.no_grad():
            logit = model(torch.from_numpy(start))
        score = F.softmax(logit, dim=-1)[torch.arange(0, b), cls_idx]
        for j in range(b):
            scores[j, i] = score[j]
        for j in range(b):
            coords = salient_order[j, step * i: step * (i + 1)]
            start.reshape(b, 3, hw)[j, :, coords] = finish.reshape(b, 3, hw)[j, :, coords]
    return np.array([official_auc(scores[j]) for j in range(b)], dtype="float32")


def official_crops(image: torch.Tensor, n: int, crop_size: float, alpha: float) -> torch.Tensor:
    """align_generator for one image (padding 0, dilation 1): n x n crops, bicubic-upscaled by alpha."""
    h, w = image.shape[-2:]
    hc, wc = int(crop_size * (h / 224)), int(crop_size * (w / 224))
    h_unit, w_unit = (h - (hc - 1) + 1) // (n - 1), (w - (wc - 1) + 1) // (n - 1)
    canvas = torch.zeros(n * n, image.shape[1], int(hc * alpha), int(wc * alpha))
    for i in range(n):
        for j in range(n):
            crop = image[:, :, i * h_unit: hc + i * h_unit, j * w_unit: wc + j * w_unit]
            canvas[i * n + j] = F.interpolate(crop, size=(int(hc * alpha), int(wc * alpha)), mode="bicubic",
                                              align_corners=False)[0]
    return canvas


def official_combine(maps: torch.Tensor, score: torch.Tensor | None, n: int, size, crop_size: float) -> torch.Tensor:
    """align_combiner without a stride: maps resized to the crop, weighted by exp(score)/max (ones without
    --score), summed on a canvas whose count starts at 1, divided by it."""
    h, w = size
    hc, wc = int(crop_size / 224 * h), int(crop_size / 224 * w)
    h_unit, w_unit = (h - (hc - 1) + 1) // (n - 1), (w - (wc - 1) + 1) // (n - 1)
    canvas = torch.zeros(1, maps.shape[1], hc + (n - 1) * h_unit, wc + (n - 1) * w_unit)
    div_canvas = torch.ones_like(canvas)
    maps = F.interpolate(maps, size=(hc, wc), mode="bilinear", align_corners=False)
    score = torch.ones(maps.shape[0]) if score is None else score
    score = score.exp()
    score /= score.max()
    for i in range(n):
        for j in range(n):
            canvas[0, :, i * h_unit: hc + i * h_unit, j * w_unit: wc + j * w_unit] += maps[i * n + j] * score[i * n + j]
            div_canvas[:, :, i * h_unit: hc + i * h_unit, j * w_unit: wc + j * w_unit] += 1
    return canvas / div_canvas


# ---- fixtures ------------------------------------------------------------------------------------------------

class PixelModel(nn.Module):
    """Logits linear in every pixel, so the order in which pixels change moves the curves."""

    def __init__(self, side: int, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * side * side, classes)
        with torch.no_grad():
            self.linear.weight.mul_(20)

    def forward(self, x):
        return self.linear(x.flatten(1))


class PooledModel(nn.Module):
    """Any input size: 4 x 4 average pooling, then logits linear in the pooled pixels (UCAG's crops)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * 16, classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(x, 4).flatten(1))


class FixedMaps(Explainer):
    """A signed 'relevance method' whose maps are fixed: channel 0 minus channel 1, average-pooled by 2 (so a
    map is smaller than its input, as a CAM's, and resizing matters); raw in the official code's sense."""

    name = "fixed"
    signed = True
    official_raw = True

    def explain(self, x, targets):
        with torch.no_grad():
            logits = self.model(x)
        return Explanation(F.avg_pool2d((x[:, :1] - x[:, 1:2]), 2), logits)


class QuantizedMaps(Explainer):
    """Maps with many ties: the image's channel 0 rounded to 3 levels, half of it exactly 0 after the ReLU."""

    name = "quantized"

    def explain(self, x, targets):
        with torch.no_grad():
            logits = self.model(x)
        return Explanation(torch.round(x[:, :1] * 1.5).clamp(min=-1), logits)


def tied_maps(batch: int, side: int) -> torch.Tensor:
    torch.manual_seed(1)
    maps = torch.randint(0, 3, (batch, side, side)).float() / 2
    maps[:, : side // 2] = 0  # a block of exact zeros, as after a ReLU
    return maps


# ---- the pixel order -----------------------------------------------------------------------------------------

def test_numpy_tie_order_is_the_official_order_and_differs_from_raster():
    maps = tied_maps(3, 16)
    ours = saliency_order(maps, ties="numpy")
    assert ours.dtype == torch.int64
    assert np.array_equal(ours.numpy(), official_order(maps.numpy()))
    raster = saliency_order(maps)
    assert not torch.equal(raster, ours)
    # both are descending orders of the same values: they differ only among ties
    flat = maps.flatten(1)
    assert torch.equal(flat.gather(1, raster), flat.gather(1, ours))
    with pytest.raises(ValueError, match="ties"):
        saliency_order(maps, ties="random")


@pytest.mark.parametrize("mode", ["del", "ins"])
def test_game_with_numpy_ties_equals_the_official_causal_metric(mode):
    side, step = 16, 16
    model = PixelModel(side).eval()
    torch.manual_seed(2)
    images = torch.randn(3, 3, side, side)
    maps = tied_maps(3, side)
    targets = torch.tensor([0, 3, 4])
    expected = official_evaluate(model, images, maps[:, None].numpy(), targets, mode, step)
    game = "deletion" if mode == "del" else "insertion"
    curves = game_curves(model, images, maps, targets, game, step, ties="numpy")
    from evaluation.insertion_deletion import auc
    assert np.allclose(auc(curves).numpy(), expected, atol=1e-6)
    raster = auc(game_curves(model, images, maps, targets, game, step)).numpy()
    assert np.abs(raster - expected).max() > 1e-3  # the tie order matters on these maps


# ---- the whole --official pipeline on fixed maps -------------------------------------------------------------

def spec_of(model: nn.Module, side: int) -> ModelSpec:
    return ModelSpec(name="pixel", model=model.eval(), target_layer="linear", categories=[str(c) for c in range(5)],
                     input_size=(side, side), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def batch_of(images: torch.Tensor) -> list[dict]:
    return [{"key": f"img{i}", "sample": Sample(path=f"img{i}.png", key=f"img{i}", label=i), "image": None,
             "pixels": image} for i, image in enumerate(images)]


def test_official_insdel_pipeline_equals_the_transcription(monkeypatch):
    """ImageMetricTask under --official (numpy ties, raw maps for official_raw methods): per row, the AUCs of
    the official CausalMetric on the maps the official code ranks (the baseline's raw maps resized to 224-frame
    size, UCAG's raw signed fold; a CAM-like method's [0, 1] maps)."""
    side, step = 32, 32
    model = PixelModel(side)
    spec = spec_of(model, side)
    torch.manual_seed(3)
    images = torch.randn(2, 3, side, side)
    monkeypatch.setattr("evaluation.image_metric.preprocess", lambda pixels, spec, device: torch.stack(pixels))
    raw = FixedMaps(model)
    tied = QuantizedMaps(model)
    rows = [Row("fixed", raw), Row("quantized", tied)]
    job = ImageMetricTask([], spec, torch.device("cpu"), rows, games(step, None, "numpy"), ("deletion", "insertion"),
                          "gt", official_ranking=True, report=write_insdel_report)
    records = job.process(batch_of(images))
    targets = torch.tensor([0, 1])
    raw_maps = F.interpolate(raw(images, targets).maps, size=(side, side), mode="bilinear", align_corners=False)
    tied_final = tied.finalize(tied(images, targets).maps, (side, side))
    assert float((tied_final == 0).float().mean()) > 0.15  # ties (zeros after the ReLU) are many
    for name, ranked in [("fixed", raw_maps), ("quantized", tied_final)]:
        for mode, field in [("del", "deletion"), ("ins", "insertion")]:
            expected = official_evaluate(model, images, ranked.numpy(), targets, mode, step)
            got = np.array([r["rows"][name][field] for r in records]) / 100
            assert np.allclose(got, expected, atol=1e-6), (name, field)
    # the default (raster ties, [0, 1] maps everywhere) differs on these maps
    plain = ImageMetricTask([], spec, torch.device("cpu"), rows, games(step, None), ("deletion", "insertion"), "gt",
                            report=write_insdel_report)
    default = plain.process(batch_of(images))
    assert any(abs(a["rows"][n][f] - b["rows"][n][f]) > 0.1 for a, b in zip(records, default, strict=True)
               for n in ("fixed", "quantized") for f in ("deletion", "insertion"))


@pytest.mark.parametrize("score", [False, True])
def test_official_ucag_of_a_raw_method_is_the_official_raw_fold(score):
    """Their ucag() for 'lrp', 'rap', ...: crops, raw maps, align_combiner, and nothing after it; ours under
    official: the same raw signed fold, ranked as it is (final_maps under official_ranking)."""
    side, n, crop, alpha = 224, 6, 124, 1.5
    model = PooledModel()
    torch.manual_seed(4)
    image = torch.randn(1, 3, side, side)
    target = torch.tensor([2])
    explainer = FixedMaps(model)
    ucag = UCAG(explainer, crop=crop, n=n, alpha=alpha, official=True, confidence=score, patch_batch=7)
    ours = ucag(image, target).maps
    crops = official_crops(image, n, crop, alpha)
    maps, logits = explainer(crops, target.expand(n * n))
    probability = F.softmax(logits, dim=1)[torch.arange(n * n), target.expand(n * n)] if score else None
    expected = official_combine(maps, probability, n, (side, side), crop)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=2e-5 * float(expected.abs().max()))
    assert float(ours.min()) < 0  # signed: no ReLU
    job = ImageMetricTask([], spec_of(model, side), torch.device("cpu"), [Row("fixed*", ucag, ucag=True)],
                          None, (), "gt", official_ranking=True, report=write_insdel_report)
    assert torch.equal(job.final_maps(job.rows[0], ours, (side, side)), ours)  # no ReLU, min-max, blur
    ranked_default = ImageMetricTask([], spec_of(model, side), torch.device("cpu"), job.rows, None, (), "gt",
                                     report=write_insdel_report)
    assert not torch.equal(ranked_default.final_maps(job.rows[0], ours, (side, side)), ours)


def test_official_baseline_of_a_raw_method_is_its_raw_map_resized():
    """Their baseline for alpha != 1: the method on the upscaled image, channel sum, bilinear to 224."""
    side = 32
    model = PooledModel()
    torch.manual_seed(5)
    images = torch.randn(2, 3, side, side)
    baseline = UpscaledInput(FixedMaps(model), 1.5)
    assert baseline.official_raw
    maps = baseline(images, [0, 1]).maps
    job = ImageMetricTask([], spec_of(model, side), torch.device("cpu"), [Row("fixed", baseline)], None, (), "gt",
                          official_ranking=True, report=write_insdel_report)
    expected = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    assert torch.equal(job.final_maps(job.rows[0], maps, (side, side)), expected)


def test_raw_methods_are_the_official_codes_list():
    """The official ucag() list, as our methods: lrp (its lrp, lrp_ab), clrp, sglrp, rap, rsp, agf, rollout,
    transformer_attribution; every other method is normalised and blurred."""
    from methods.registry import _BUILDERS, available_methods  # noqa: F401
    from methods.relevance.explainers import AGF, CLRP, LRP, RAP, RSP, SGLRP
    from methods.transformer.chefer import GradRollout, TransformerAttribution
    from methods.transformer.cplrp import CPLRP
    from methods.transformer.rollout import Rollout
    raw = {cls for cls in (LRP, CLRP, SGLRP, RAP, RSP, AGF, Rollout, TransformerAttribution) if cls.official_raw}
    assert len(raw) == 8
    assert not GradRollout.official_raw and not CPLRP.official_raw


@pytest.mark.slow
def test_official_insdel_script_records_numpy_and_refuses_a_raster_folder(tmp_path, capsys):
    import insdel
    from evaluation.errors import StoreError
    from tests.conftest import EXAMPLES
    base = ["gradcam", "--img-path", str(EXAMPLES), "--limit", "1", "--workers", "0", "--device", "cpu",
            "--step", "20000", "--batch-size", "1"]
    out = tmp_path / "run"
    assert insdel.main([*base, "--out", str(out)]) == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["tie_order"] == "raster" and "numpy" not in recorded
    with pytest.raises(StoreError, match="tie_order: 'raster' -> 'numpy'"):
        insdel.main([*base, "--out", str(out), "--official"])
    # a run.json written before the tie order was recorded resumes as the raster order it was
    del recorded["tie_order"]
    (out / "run.json").write_text(json.dumps(recorded))
    assert insdel.main([*base, "--out", str(out)]) == 0
    with pytest.raises(StoreError, match="tie_order: 'raster' -> 'numpy'"):
        insdel.main([*base, "--out", str(out), "--official"])
    official = tmp_path / "official"
    assert insdel.main([*base, "--out", str(official), "--official"]) == 0
    recorded = json.loads((official / "run.json").read_text())
    assert recorded["tie_order"] == "numpy" and recorded["numpy"] == np.__version__
    assert recorded["about"]["numpy_simd"]
    summary = json.loads((official / "summary.json").read_text())
    assert summary["tie_order"] == "numpy" and "about" not in summary
