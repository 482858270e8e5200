"""An all-zero final map (nothing left after the ReLU) ranks pixels in raster order: insdel/density warn once
per row and count such maps in summary.json."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.datasets import Sample
from evaluation.image_metric import ImageMetricTask
from evaluation.reports import write_insdel_report
from evaluation.rows import Row
from insdel import games
from methods.base import Explainer, Explanation
from models.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


class SignOf(Explainer):
    """Maps = channel 0 of the image: an image whose channel 0 is all negative has an all-zero final map."""

    name = "sign"

    def explain(self, x, targets):
        with torch.no_grad():
            return Explanation(x[:, :1].clone(), self.model(x))


def test_zero_final_maps_are_warned_about_once_and_counted(monkeypatch, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    spec = ModelSpec(name="tiny", model=model, target_layer="1", categories=list("abcd"), input_size=(8, 8),
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    monkeypatch.setattr("evaluation.image_metric.preprocess", lambda pixels, spec, device: torch.stack(pixels))
    images = torch.rand(3, 3, 8, 8)
    images[1, 0] = -images[1, 0] - 0.1  # all negative: nothing survives the ReLU
    batch = [{"key": f"img{i}", "sample": Sample(path=f"img{i}.png", key=f"img{i}", label=0), "image": None,
              "pixels": image} for i, image in enumerate(images)]
    job = ImageMetricTask([], spec, torch.device("cpu"), [Row("sign", SignOf(model))], games(16, None),
                          ("deletion", "insertion"), "gt", report=write_insdel_report)
    records = job.process(batch)
    assert [r["rows"]["sign"]["zero_map"] for r in records] == [False, True, False]
    job.process(batch)  # a second batch with a zero map: no second warning
    err = capsys.readouterr().out
    assert err.count("warning: sign: the final map of img1 is all zero") == 1
    summary = job.summarize(records)
    assert summary["rows"][0]["zero_maps"] == 1
    # records written before the flag existed: the count is unknown, not 0
    old = [{**r, "rows": {"sign": {k: v for k, v in r["rows"]["sign"].items() if k != "zero_map"}}} for r in records]
    assert job.summarize(old)["rows"][0]["zero_maps"] is None
