"""ROAD (evaluation/imputation.py, evaluation/road.py, road.py): the imputation by hand and by its properties,
against pytorch-grad-cam's and Quantus's imputers and ROAD metrics on the same maps (test-only peers), the
script end to end, resume, batch independence and bad flags."""
import json

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

import road
from evaluation.imputation import imputation_system, impute
from evaluation.road import RoadMetric, removal_orders, removed_count
from methods import build_explainer
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import FAST, run

ROAD_FAST = [*FAST, "--percentiles", "30", "70"]


def tie_free(maps: torch.Tensor) -> torch.Tensor:
    """The maps plus a tiny seeded jitter: no two pixels equal, so every peer's ranking is the same."""
    jitter = torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))
    return maps + 1e-4 * jitter


@pytest.fixture(scope="module")
def gradcam_maps(lite, photo_batch):
    explainer = build_explainer("gradcam", lite)
    raw, logits = explainer(photo_batch[:2])
    maps = tie_free(explainer.finalize(raw, tuple(photo_batch.shape[-2:])))
    return photo_batch[:2], maps, logits.argmax(dim=1)


def test_one_pixel_by_hand():
    image = np.arange(9, dtype=float).reshape(1, 3, 3) ** 2
    filled = impute(image, np.array([4]), 0.0, None)
    edges, corners = image[0, [0, 1, 1, 2], [1, 0, 2, 1]], image[0, [0, 0, 2, 2], [0, 2, 0, 2]]
    assert filled[0, 1, 1] == pytest.approx(edges.sum() / 6 + corners.sum() / 12)
    np.testing.assert_array_equal(np.delete(filled.ravel(), 4), np.delete(image.ravel(), 4))


def test_a_corner_pixel_takes_the_mean_of_its_three_neighbours_by_weight():
    image = np.array([[[0.0, 6.0], [12.0, 24.0]]])
    filled = impute(image, np.array([0]), 0.0, None)
    assert filled[0, 0, 0] == pytest.approx((6 / 6 + 12 / 6 + 24 / 12) / (1 / 6 + 1 / 6 + 1 / 12))


def test_linear_images_are_reproduced_inside():
    """The weights are symmetric, so the imputation of a linear image away from the border is exact."""
    rows, columns = np.mgrid[:12, :12]
    image = np.stack([2.0 * rows - columns, 0.5 * columns + 3, rows * 0.0 + 1.0])
    hole = np.zeros((12, 12), dtype=bool)
    hole[3:9, 2:10] = True
    filled = impute(image, np.flatnonzero(hole.ravel()), 0.0, None)
    np.testing.assert_allclose(filled, image, atol=1e-10)


def test_the_system_is_symmetric_positive_definite():
    rng = np.random.default_rng(1)
    image = rng.random((3, 9, 9))
    removed = np.sort(rng.choice(81, 70, replace=False))
    matrix, _ = imputation_system(image, removed)
    dense = matrix.toarray()
    np.testing.assert_allclose(dense, dense.T)
    assert np.linalg.eigvalsh(dense).min() > 0


def test_noise_has_the_given_sigma_and_is_seeded():
    image = np.zeros((3, 40, 40))
    removed = np.arange(0, 1600, 2)
    first = impute(image, removed, 0.5, np.random.default_rng([0, 7]))
    again = impute(image, removed, 0.5, np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(first, again)
    assert first.reshape(3, -1)[:, removed].std() == pytest.approx(0.5, rel=0.05)
    assert np.all(np.delete(first.reshape(3, -1), removed, axis=1) == 0)


def test_equals_the_peer_imputers(gradcam_maps):
    """pytorch-grad-cam's and Quantus's copies of the ROAD authors' imputer (noise 0), on a photo and a MoRF
    mask of its Grad-CAM map."""
    from quantus.functions.perturb_func import noisy_linear_imputation
    images, maps, _ = gradcam_maps
    removed = np.sort(removal_orders(maps)["morf"][0, :removed_count(224 * 224, 40)])
    ours = impute(images[0].numpy(), removed, 0.0, None)
    keep = np.ones(224 * 224, dtype=np.float32)
    keep[removed] = 0
    peer = NoisyLinearImputer(noise=0.0)(images[0], torch.from_numpy(keep).view(224, 224)).numpy()
    np.testing.assert_allclose(ours, peer, atol=1e-5)
    quantus_peer = noisy_linear_imputation(images[0].numpy().astype(np.float64), removed, noise=0.0)
    np.testing.assert_allclose(ours, quantus_peer, atol=1e-5)
    assert np.abs(ours - images[0].numpy()).max() > 0.1  # the imputation changed the image


def test_equals_pytorch_grad_cam_road(lite, gradcam_maps):
    """pytorch-grad-cam's ROAD*RelevantFirst(q) removes the pixels at or above the map's q-th percentile (MoRF;
    LeRF: of 1 - map), i.e. (100 - q) % of them, floor(p N / 100 + q / 100) pixels for p = 100 - q: the same
    pixels as ours where the counts agree (p = 25, 50, 75 for 224 x 224), and returns the score change."""
    images, maps, targets = gradcam_maps
    percentiles = [25, 50, 75]
    ours = RoadMetric(percentiles, noise=0.0)(lite.model, images, maps, targets, keys=["a", "b"])
    softmax_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    cams = maps[:, 0].numpy()
    for order, removal in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
        peer = np.stack([PerturbationConfidenceMetric(removal(100 - p, NoisyLinearImputer(noise=0.0)))(
            images, cams, softmax_targets, lite.model) for p in percentiles], axis=1)
        change = ours[f"{order}_curve"] - ours["original"][:, None]
        np.testing.assert_allclose(change.numpy(), peer, atol=1e-5)
    assert ours["morf"].mean() < ours["lerf"].mean()


def test_equals_quantus_road(lite, gradcam_maps):
    """Quantus's ROAD (MoRF only) scores 1[argmax = target] after removing int(a_size p / 100) pixels. In Quantus
    0.6.0 a_size is the attribution's whole (C, H, W) size and the map is ranked broadcast over the channels, so a
    one-channel map on an RGB image ends in an IndexError: it gets a three-channel map whose channels 1 and 2
    rank last, and p / 3."""
    import quantus
    images, maps, targets = gradcam_maps
    percentiles = [10, 30, 50, 70, 90]
    pixels = 224 * 224
    assert all(int(3 * pixels * (p / 3) / 100) == removed_count(pixels, p) for p in percentiles)
    ours = RoadMetric(percentiles, noise=0.0)(lite.model, images, maps, targets, keys=["a", "b"])
    padded = np.concatenate([maps.numpy(), np.full((2, 2, 224, 224), -1e3, dtype=np.float32)], axis=1)
    metric = quantus.ROAD(percentages=[p / 3 for p in percentiles], noise=0.0, normalise=False, abs=False,
                          display_progressbar=False, disable_warnings=True)
    peer = metric(model=lite.model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=padded,
                  device="cpu", batch_size=2)
    np.testing.assert_allclose(list(peer.values()), ours["morf_correct"].mean(dim=0).numpy())
    with pytest.raises(IndexError):  # the peer's bug on a one-channel map (left here to notice its fix)
        quantus.ROAD(percentages=[50], noise=0.0, normalise=False, abs=False, display_progressbar=False,
                     disable_warnings=True)(model=lite.model, x_batch=images.numpy(), y_batch=targets.numpy(),
                                            a_batch=maps.numpy(), device="cpu")


def test_curves_fall_and_are_not_constant(lite, gradcam_maps):
    """Regression against a ROAD curve that is 0 (or constant) at every percentile: on the embedded model the
    MoRF curve falls and the LeRF curve stays above it."""
    images, maps, targets = gradcam_maps
    scores = RoadMetric()(lite.model, images, maps, targets, keys=["a", "b"])
    morf, lerf = scores["morf_curve"], scores["lerf_curve"]
    assert morf.std(dim=1).min() > 0.01 and lerf.std(dim=1).min() > 0.001
    assert torch.all(morf[:, 0] > morf[:, -1])
    assert torch.all(scores["lerf"] > scores["morf"])


def test_noise_depends_on_the_key_not_the_batch(lite, gradcam_maps):
    images, maps, targets = gradcam_maps
    metric = RoadMetric([50], noise=0.01)
    together = metric(lite.model, images, maps, targets, keys=["a", "b"])
    alone = metric(lite.model, images[1:], maps[1:], targets[1:], keys=["b"])
    np.testing.assert_allclose(together["morf_curve"][1:].numpy(), alone["morf_curve"].numpy(), atol=1e-6)
    renamed = metric(lite.model, images[1:], maps[1:], targets[1:], keys=["c"])
    assert not torch.equal(renamed["morf_curve"], alone["morf_curve"])


def test_script_outputs_and_resume(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *ROAD_FAST, "--img-path", str(EXAMPLES), "--out", str(out), "--batch-size", "2"]

    def stop_after_first(number):
        if number == 0:
            raise KeyboardInterrupt

    code, _, _ = run(road, argv, capsys, on_batch=stop_after_first)
    assert code != 0
    code, _, err = run(road, argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["percentiles"] == [30, 70]
    assert [r["name"] for r in summary["rows"]] == ["gradcam", "gradcam*"]
    for row in summary["rows"]:
        assert len(row["morf_mean_curve"]) == 2 and 0 <= row["morf"] <= 1 and 0 <= row["lerf_accuracy"] <= 1
    assert "| gradcam* |" in (out / "table.md").read_text()
    assert (out / "road_curves.png").stat().st_size > 5000
    assert json.loads((out / "run.json").read_text())["metric"] == "road"
    fresh = tmp_path / "fresh"
    code, _, err = run(road, [*argv[:-4], "--out", str(fresh), "--batch-size", "4"], capsys)
    assert code == 0, err
    again = json.loads((fresh / "summary.json").read_text())
    for resumed, whole in zip(summary["rows"], again["rows"], strict=True):
        assert resumed["morf_mean_curve"] == pytest.approx(whole["morf_mean_curve"], abs=1e-6)
        assert resumed["lerf"] == pytest.approx(whole["lerf"], abs=1e-6)


def test_other_settings_are_not_resumed_into(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["gradcam", "--workers", "0", "--device", "cpu", "--img-path", str(EXAMPLES), "--limit", "1",
            "--percentiles", "50", "--out", str(out)]
    assert run(road, base, capsys)[0] == 0
    code, _, err = run(road, [*base, "--imputation-noise", "0"], capsys)
    assert code != 0 and "imputation_noise" in err


@pytest.mark.parametrize("flags, message", [
    (["--percentiles", "0", "50"], "--percentiles must each lie in (0, 100), got 0"),
    (["--percentiles", "100"], "--percentiles must each lie in (0, 100), got 100"),
    (["--percentiles", "50", "50"], "--percentiles are given twice"),
    (["--percentiles", "ten"], "invalid float value"),
    (["--imputation-noise", "-1"], "--imputation-noise must be 0 or more"),
    (["--imputation-noise", "nan"], "--imputation-noise must be 0 or more"),
    (["--score-batch", "0"], "--score-batch must be at least 1"),
])
def test_bad_flags(tmp_path, capsys, flags, message):
    code, _, err = run(road, ["gradcam", "--img-path", str(EXAMPLES), "--out", str(tmp_path / "o"), *flags], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
