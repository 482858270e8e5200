"""Average drop / increase in confidence (evaluation/confidence_change.py, confidence.py): by hand, against
pytorch-grad-cam's DropInConfidence / IncreaseInConfidence and torchcam's ClassificationMetric on the same maps
(test-only peers), end to end."""
import contextlib
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

import confidence
from evaluation.confidence_change import confidence_change
from methods import build_explainer
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import FAST, run


class ChannelSum(torch.nn.Module):
    """Logits (0, sum of channel 0)."""

    def forward(self, x):
        score = x[:, 0].sum(dim=(1, 2))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def test_by_hand():
    x = torch.ones(2, 3, 2, 2)
    x[1] = -1.0
    maps = torch.tensor([[[[1.0, 0.5], [0.0, 0.5]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    scores = confidence_change(ChannelSum(), x, maps, torch.tensor([1, 1]))
    # image 0: class-1 probability sigmoid(4) on the image, sigmoid(2) masked (channel-0 sum of M * X = 2)
    y0, o0 = sigmoid(4.0), sigmoid(2.0)
    # image 1: sigmoid(-4) on the image, sigmoid(-2) masked: the confidence rises
    y1, o1 = sigmoid(-4.0), sigmoid(-2.0)
    expected_drop = [(y0 - o0) / y0, 0.0]
    np.testing.assert_allclose(scores["drop"].numpy(), expected_drop, rtol=1e-6)
    np.testing.assert_array_equal(scores["increase"].numpy(), [0.0, 1.0])
    np.testing.assert_allclose(scores["change"].numpy(), [o0 - y0, o1 - y1], rtol=1e-5)


def test_equals_pytorch_grad_cam_on_the_same_maps(lite, photo_batch):
    """pytorch-grad-cam multiplies the normalised input by the map as we do; its DropInConfidence is the
    unnormalised max(0, Y - O) (Chattopadhay et al. and torchcam divide by Y), its IncreaseInConfidence the
    same indicator 1[O > Y]."""
    explainer = build_explainer("gradcam", lite)
    raw, logits = explainer(photo_batch)
    targets = logits.argmax(dim=1)
    maps = explainer.finalize(raw, tuple(photo_batch.shape[-2:]))
    ours = confidence_change(lite.model, photo_batch, maps, targets)
    cams = maps[:, 0].numpy()
    peer_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    drop = DropInConfidence()(photo_batch, cams, peer_targets, lite.model)
    increase = IncreaseInConfidence()(photo_batch, cams, peer_targets, lite.model)
    with torch.no_grad():
        original = torch.softmax(lite.model(photo_batch), dim=1).gather(1, targets[:, None])[:, 0]
    np.testing.assert_allclose((ours["drop"] * original).numpy(), np.asarray(drop).ravel(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ours["increase"].numpy(), np.asarray(increase).ravel())
    assert ours["drop"].max() > 0  # the comparison is not all zeros


class FixedMaps:
    """A torchcam CAM extractor that returns given maps: torchcam's metric then scores exactly our maps."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **options):
        return [self.maps[:, 0]]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


def test_equals_torchcam_on_the_same_maps(lite, photo_batch):
    """torchcam's Average Drop is relu(Y - O) / (Y + 1e-7) (ours: / Y) and its increase 1[Y < O], both means
    over the images, on the normalised input times the map, as ours."""
    metrics = pytest.importorskip("torchcam.metrics")  # torchcam 0.5.0 needs Python >= 3.11
    explainer = build_explainer("gradcam", lite)
    raw, logits = explainer(photo_batch)
    targets = logits.argmax(dim=1)
    maps = explainer.finalize(raw, tuple(photo_batch.shape[-2:]))
    ours = confidence_change(lite.model, photo_batch, maps, targets)
    peer = metrics.ClassificationMetric(FixedMaps(lite.model, maps), partial(torch.softmax, dim=-1))
    peer.update(photo_batch, class_idx=[int(t) for t in targets])
    summary = peer.summary()
    assert summary["avg_drop"] == pytest.approx(float(ours["drop"].mean()), rel=1e-5, abs=1e-7)
    assert summary["conf_increase"] == pytest.approx(float(ours["increase"].mean()), abs=1e-12)
    assert 0 < summary["avg_drop"]


def test_script_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(confidence, ["layercam", *FAST, "--img-path", str(EXAMPLES), "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 and [r["name"] for r in summary["rows"]] == ["layercam", "layercam*"]
    for row in summary["rows"]:
        assert 0 <= row["drop"] <= 1 and 0 <= row["increase"] <= 1 and -1 <= row["change"] <= 1
    table = (out / "table.md").read_text()
    assert "| layercam* |" in table and "Average drop %" in table
    assert (out / "confidence.png").stat().st_size > 5000
    assert json.loads((out / "run.json").read_text())["metric"] == "confidence"
    assert len((out / "per_image.csv").read_text().splitlines()) == 5
