"""insdel.py and density.py end to end: outputs, skipped files, resume, and torchrun sharding."""
import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import density
import insdel
from app.lifecycle import run_cli
from tests.conftest import EXAMPLES, REPO

FAST = ["--ucag", "-n", "2", "-a", "1.0", "-c", "180", "--workers", "0", "--device", "cpu"]
INSDEL_FAST = FAST + ["--step", str(224 * 56)]


def imagenet_folder(root, broken=True):
    layout = {"n02124075": ["chelsea.jpg"], "n07920052": ["coffee.jpg"], "n03976467": ["camera.png"],
              "n03785016": ["motorcycle.jpg"]}
    for wnid, names in layout.items():
        (root / wnid).mkdir(parents=True)
        for name in names:
            shutil.copy(EXAMPLES / name, root / wnid / name)
    if broken:
        (root / "n02124075" / "broken.JPEG").write_bytes(b"\xff\xd8 nope")
    return root


def run(module, argv, capsys, on_batch=None):
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda a: module.main(a, on_batch=on_batch), argv, prog=module.PROG)
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_insdel_outputs_and_skipped_files(tmp_path, capsys):
    data = imagenet_folder(tmp_path / "val")
    out = tmp_path / "out"
    code, stdout, err = run(insdel, ["gradcam", *INSDEL_FAST, "--img-path", str(data), "--out", str(out),
                                     "--batch-size", "2"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"model", "method", "n_images", "step", "tie_order", "target", "rows"}
    assert summary["n_images"] == 4 and summary["target"] == "gt" and summary["step"] == 224 * 56
    assert [(r["name"], r["ucag"]) for r in summary["rows"]] == [("gradcam", False), ("gradcam*", True)]
    for row in summary["rows"]:
        assert 0 <= row["deletion"] <= 100 and 0 <= row["insertion"] <= 100
    header = (out / "per_image.csv").read_text().splitlines()[0]
    assert header == "file,target,gradcam_deletion,gradcam_insertion,gradcam*_deletion,gradcam*_insertion"
    assert len((out / "per_image.csv").read_text().splitlines()) == 5
    assert "broken.JPEG" in (out / "skipped.txt").read_text()
    assert "| gradcam* |" in (out / "table.md").read_text() and (out / "curves.png").stat().st_size > 10000


def test_density_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(density, ["layercam", *FAST, "--img-path", str(EXAMPLES), "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "pred" and summary["n_images"] == 4
    assert [set(r) for r in summary["rows"]] == [{"name", "ucag", "positive", "negative", "zero_maps"}] * 2
    assert all(r["positive"] > 0 and r["negative"] > 0 and r["zero_maps"] == 0 for r in summary["rows"])
    assert "Positive map density" in (out / "table.md").read_text()


def test_resume_after_interruption_matches_a_clean_run(tmp_path, capsys):
    data = imagenet_folder(tmp_path / "val")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    argv = ["xgradcam", *INSDEL_FAST, "--img-path", str(data), "--batch-size", "2"]
    assert run(insdel, argv + ["--out", str(clean)], capsys)[0] == 0

    def interrupt(batch_number):
        if batch_number == 0:
            raise KeyboardInterrupt

    code, _, _ = run(insdel, argv + ["--out", str(resumed)], capsys, on_batch=interrupt)
    assert code == 130
    part = (resumed / "parts" / "part-0.jsonl").read_text().splitlines()
    assert len(part) == 2 and not (resumed / "summary.json").exists()
    with open(resumed / "parts" / "part-0.jsonl", "a") as handle:
        handle.write('{"key": "cut short by a crash')  # a half-written line is ignored
    assert run(insdel, argv + ["--out", str(resumed)], capsys)[0] == 0
    assert json.loads((resumed / "summary.json").read_text()) == json.loads((clean / "summary.json").read_text())
    assert (resumed / "per_image.csv").read_text() == (clean / "per_image.csv").read_text()
    # a third run finds everything done and rewrites the same outputs
    assert run(insdel, argv + ["--out", str(resumed)], capsys)[0] == 0
    assert json.loads((resumed / "summary.json").read_text())["n_images"] == 4


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *FAST, "--img-path", str(EXAMPLES / "chelsea.jpg"), "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    code, _, err = run(density, argv[:-2] + ["-a", "1.5", "--out", str(out)], capsys)
    assert code == 2 and "holds results of other settings (alpha: 1.0 -> 1.5)" in err


@pytest.mark.parametrize("argv,message", [
    (["--img-path", "{tmp}/none"], "does not exist"),
    (["--img-path", "{tmp}"], "no image files"),
    (["--img-path", "{examples}", "--target", "gt"], "--target gt needs ground truth"),
    (["--img-path", "{examples}", "--labels", "{tmp}/labels.txt"], "has 1 labels but"),
    (["--img-path", "{examples}", "--limit", "0"], "--limit must be at least 1"),
])
def test_bad_dataset_inputs(argv, message, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("1\n")
    argv = [a.format(tmp=tmp_path, examples=EXAMPLES) for a in argv]
    code, _, err = run(insdel, ["gradcam", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("script", ["insdel.py", "density.py"])
def test_torchrun_two_processes_equal_one(script, tmp_path):
    data = imagenet_folder(tmp_path / "val")
    argv = ["gradcam", *(INSDEL_FAST if script == "insdel.py" else FAST), "--img-path", str(data),
            "--batch-size", "1"]
    single = subprocess.run([sys.executable, script, *argv, "--out", str(tmp_path / "one")], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    double = subprocess.run([*launcher, script, *argv, "--out", str(tmp_path / "two")], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
    assert parts == ["part-0.jsonl", "part-1.jsonl"]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["n_images"] == two["n_images"] == 4
    for row_one, row_two in zip(one["rows"], two["rows"], strict=True):
        assert row_one.keys() == row_two.keys()
        for field, value in row_one.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value == pytest.approx(row_two[field], rel=1e-5), field
            else:  # names and flags compare exactly
                assert value == row_two[field], field
    assert (tmp_path / "one" / "skipped.txt").read_text() == (tmp_path / "two" / "skipped.txt").read_text()


def test_default_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(density, ["gradcam", *FAST, "--img-path", str(EXAMPLES / "coffee.jpg")], capsys)
    assert code == 0, err
    assert (tmp_path / "results" / "density" / "efficientnet_lite0_gradcam_ucag" / "summary.json").exists()


def official_args(official: bool):
    import argparse
    return argparse.Namespace(method="gradcam", name="efficientnet_lite0", weights="default", target_layer=None,
                              ucag=True, alpha=2.0, crop_size=124, num_patches=2, patch_batch=8,
                              no_confidence=False, official=official, score=False, device="cpu", batch_size=1,
                              workers=0, mask_batch=None, steps=None, baseline=None, path_batch=None,
                              resolutions=None, masks=None, cell=None, keep_prob=None, seed=None, rule=None)


def test_official_baseline_runs_the_explainer_on_the_upscaled_image(lite, photo_batch):
    import torch.nn.functional as F

    from app.setup import build_setup
    from methods import finalize_maps
    from ucag import UpscaledInput

    setup = build_setup(official_args(True))
    targets = torch.tensor([285])
    x = photo_batch[1:2]
    baseline = setup.rows()[0]
    assert isinstance(baseline.explainer, UpscaledInput) and baseline.name == "gradcam"
    plain_explainer = setup.ucag.explainer
    upscaled = F.interpolate(x, size=(448, 448), mode="bicubic", align_corners=False)
    expected = finalize_maps(plain_explainer(upscaled, targets).maps, (224, 224))
    explanation = baseline.explainer(x, targets)
    assert torch.allclose(baseline.explainer.finalize(explanation.maps, (224, 224)), expected, atol=1e-6)
    assert torch.allclose(explanation.logits, lite.model(x), atol=1e-5)  # the contract: logits of x itself
    assert setup.settings()["baseline_alpha"] == 2.0

    plain = build_setup(official_args(False))
    assert plain.rows()[0].explainer is plain.ucag.explainer
    assert "baseline_alpha" not in plain.settings()


@pytest.mark.parametrize("method", ["gradcam", "rollout"])
def test_insdel_and_density_run_on_a_timm_transformer_with_ucag(method, tmp_path, capsys):
    """The evaluation scripts take timm:<name> models; UCAG's crops go to the ViT at alpha * crop."""
    data = imagenet_folder(tmp_path / "val", broken=False)
    model = ["--name", "timm:vit_tiny_patch16_224", "--weights", "random", "-a", "1.5", "--limit", "1"]
    fast = FAST[:3] + FAST[5:]  # FAST without its -a 1.0: the crops go to the ViT upscaled
    for script, extra in ((insdel, ["--step", str(224 * 56)]), (density, [])):
        out = tmp_path / f"out_{script.PROG}"
        code, _, err = run(script, [method, *fast, *model, *extra, "--img-path", str(data), "--out", str(out)],
                           capsys)
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["n_images"] == 1 and [r["name"] for r in summary["rows"]] == [method, f"{method}*"]
        assert json.loads((out / "run.json").read_text())["model"] == "timm:vit_tiny_patch16_224"
        assert json.loads((out / "run.json").read_text())["timm_model"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
        assert "crop_input" not in json.loads((out / "run.json").read_text())
