"""--precision: TF32 switches, bf16 autocast against float32 (maps and insertion/deletion AUCs), the methods
that stay float32, and the run identity; on the ``--device`` (cpu by default; cuda in benchmarks/gpu_check.sh)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import insdel
import visualization
from common.precision import Precision, PrecisionError, full_precision
from evaluation.errors import StoreError
from evaluation.insertion_deletion import auc, game_curves
from methods import build_explainer
from methods.sise import SISE, AdaSISE
from models import load_model, preprocess
from ucag import UCAG

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Largest differences measured on the bundled photos (efficientnet_lite0, CPU bf16, finalised [0, 1] maps):
# 0.017 (Grad-CAM) and 0.034 (UCAG(Grad-CAM)); the bounds leave room for other CPUs' bf16 kernels.
MAP_TOLERANCE = 0.08
AUC_TOLERANCE = 1.5  # AUC x 100


@pytest.fixture(scope="module")
def lite(lite, device):
    """The embedded model on the --device (the session's own on a CPU)."""
    return lite if device.type == "cpu" else load_model("efficientnet_lite0", "default", device)


@pytest.fixture(scope="module")
def photo_batch(lite, photos, device):
    return preprocess(photos, lite, device)


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_precision_switches_tf32_and_describes_itself(tf32_flags):
    Precision("tf32").apply()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    Precision("fp32").apply()  # PyTorch's own default keeps cuDNN's TF32 on: fp32 switches it off
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert Precision("fp32").describe() == "float32"
    assert Precision("bf16").describe() == "float32, bf16 autocast"
    with pytest.raises(PrecisionError, match="unknown precision 'fp16'"):
        Precision("fp16")


def test_autocast_region_and_full_precision_opt_out():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with Precision("bf16").autocast():
        assert layer(x).dtype == torch.bfloat16
        with full_precision("cpu"):
            assert layer(x).dtype == torch.float32
    with Precision("fp32").autocast():
        assert layer(x).dtype == torch.float32


def _final(explainer, x, precision):
    with Precision(precision, x.device).autocast():
        maps, logits = explainer(x)
    assert maps.dtype == torch.float32 and logits.dtype == torch.float32  # the contract, whatever the region
    return explainer.finalize(maps, tuple(x.shape[-2:]))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "xgradcam", "ucag"])
def test_bf16_maps_stay_close_to_float32(method, lite, photo_batch):
    x = photo_batch[:1] if method == "ucag" else photo_batch[:2]
    explainer = (UCAG(build_explainer("gradcam", lite), n=3, alpha=1.5) if method == "ucag"
                 else build_explainer(method, lite))
    full, half = _final(explainer, x, "fp32"), _final(explainer, x, "bf16")
    difference = (full - half).abs().max()
    assert 0 < difference < MAP_TOLERANCE, difference  # not 0: the autocast region did compute in bf16
    # correlation measured 0.9989 for LayerCAM (its elementwise relu(g) * A keeps bf16's noise), above 0.999 else
    assert torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1] > 0.998


@pytest.mark.parametrize("method", ["gradient", "guided", "deconv", "fullgrad"])
def test_pixel_gradient_methods_stay_float32(method, lite, photo_batch):
    explainer = build_explainer(method, lite)
    assert torch.equal(_final(explainer, photo_batch[:1], "fp32"), _final(explainer, photo_batch[:1], "bf16"))


@pytest.mark.parametrize("method", ["lrp", "rap", "agf"])
def test_relevance_methods_stay_float32(method, device):
    torch.manual_seed(0)
    spec = load_model("resnet18", "random", device)
    explainer = build_explainer(method, spec)
    x = torch.randn(1, 3, 96, 96).to(device)
    with Precision("bf16", device).autocast():
        half = explainer(x).maps
    assert torch.equal(explainer(x).maps, half)


@pytest.mark.parametrize("cls", [SISE, AdaSISE])
def test_sise_methods_stay_float32(cls):
    """Otsu-gated fusion turns bf16 rounding into different masks and gates: SISE and Ada-SISE opt out."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    explainer = cls(model, ["1", "4"], mask_batch=16)
    x = torch.randn(2, 3, 32, 32)
    with Precision("bf16").autocast():
        half = explainer(x, [1, 3]).maps
    assert torch.equal(explainer(x, [1, 3]).maps, half) and half.abs().sum() > 0


def test_ucag_keeps_its_inner_explainers_opt_out(device):
    """UCAG calls the inner explainer through its internal entry point: a float32-only method stays float32."""
    torch.manual_seed(0)
    spec = load_model("resnet18", "random", device)
    ucag = UCAG(build_explainer("lrp", spec), n=2, alpha=1.0)
    x = torch.randn(1, 3, 96, 96).to(device)
    with Precision("bf16", device).autocast():
        half = ucag(x).maps
    assert half.dtype == torch.float32
    assert torch.allclose(ucag(x).maps, half, atol=1e-6, rtol=1e-5)  # only UCAG's own logits in bf16


def test_bf16_insertion_deletion_aucs_stay_close(lite, photo_batch):
    x = photo_batch[:2]
    explainer = build_explainer("gradcam", lite)
    maps, logits = explainer(x)
    saliency = explainer.finalize(maps, (224, 224))[:, 0]
    targets = logits.argmax(1)
    for mode in ("deletion", "insertion"):
        full = auc(game_curves(lite.model, x, saliency, targets, mode, 224 * 28)) * 100
        with Precision("bf16", x.device).autocast():
            half = auc(game_curves(lite.model, x, saliency, targets, mode, 224 * 28)) * 100
        assert (full - half).abs().max() < AUC_TOLERANCE, (mode, full, half)
        assert not torch.equal(full, half)


def test_cli_precision_is_recorded_and_a_change_refused(tmp_path, capsys, device):
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted(EXAMPLES.iterdir())[0]
    (folder / source.name).write_bytes(source.read_bytes())
    out = tmp_path / "out"
    argv = ["gradcam", "--img-path", str(folder), "--out", str(out), "--workers", "0", "--step", str(224 * 56),
            "--target", "pred", "--device", str(device)]
    assert insdel.main(argv + ["--precision", "bf16"]) == 0
    recorded = json.loads((out / "run.json").read_text())["precision"]
    assert recorded == "float32, bf16 autocast" + (", tf32 matmul False, tf32 cudnn False" if device.type == "cuda"
                                                   else "")
    with pytest.raises(StoreError, match="precision"):
        insdel.main(argv + ["--precision", "fp32"])


def test_visualization_runs_in_bf16(tmp_path, device):
    source = sorted(EXAMPLES.iterdir())[0]
    assert visualization.main(["gradcam", "--ucag", "-n", "2", "-a", "1.2", "--img-path", str(source),
                               "--out", str(tmp_path), "--precision", "bf16", "--workers", "0",
                               "--device", str(device)]) == 0
    assert (tmp_path / f"{source.stem}_gradcam.png").is_file()


def test_tf32_engages_the_tensor_cores_and_fp32_does_not(device, tf32_flags):
    """On a GPU, tf32 changes a float32 product (10-bit mantissa inside) and fp32 switches it back."""
    if device.type != "cuda":
        pytest.skip("runs with --device cuda (benchmarks/gpu_check.sh)")
    generator = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(256, 256, generator=generator).to(device) for _ in range(2))
    exact = (a.double() @ b.double()).float()
    Precision("fp32", device).apply()
    full = a @ b
    Precision("tf32", device).apply()
    tensor_cores = a @ b
    assert (full - exact).abs().max() < 1e-3 < (tensor_cores - exact).abs().max()
