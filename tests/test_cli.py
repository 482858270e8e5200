"""visualization.py end to end on the bundled photos, and one clear line for every bad input."""
import csv
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import visualization
from app.lifecycle import run_cli
from common.images import load_rgb
from tests.conftest import EXAMPLES, REPO

FAST = ["-n", "3", "-a", "1.3", "--workers", "0"]


def run(argv, capsys):
    """Run visualization.py in-process like the shell does: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        run_cli(visualization.main, argv, prog=visualization.PROG)
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_examples_end_to_end(tmp_path, capsys):
    code, out, err = run(["gradcam", "--ucag", *FAST, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [row["class"] for row in rows] == ["tripod", "Egyptian cat", "espresso", "moped"]
    for image_path in sorted(EXAMPLES.iterdir()):
        height, width = load_rgb(image_path).shape[:2]
        for suffix in ["", "_ucag"]:
            saliency = np.load(tmp_path / f"{image_path.stem}_gradcam{suffix}.npy")
            assert saliency.dtype == np.float32 and saliency.shape == (height, width)
            assert saliency.min() == 0.0 and saliency.max() == 1.0
        figure = np.asarray(Image.open(tmp_path / f"{image_path.stem}_gradcam.png"))
        panel_width = round(width * 300 / height)
        assert figure.shape[1] == 3 * panel_width + 2 * 6  # input | map | UCAG map, 300 px high
    assert (tmp_path / "skipped.txt").read_text() == ""
    assert "wrote maps of 4 image(s)" in out


def test_default_geometry_single_image_matches_library(tmp_path, capsys, lite):
    image = EXAMPLES / "chelsea.jpg"
    code, _, err = run(["layercam", "--ucag", "--img-path", str(image), "--out", str(tmp_path), "--device", "cpu"],
                       capsys)
    assert code == 0, err
    from methods import build_explainer, finalize_maps
    from models import preprocess
    from ucag import UCAG
    rgb = load_rgb(image)
    x = preprocess([rgb], lite, "cpu")
    ucag = UCAG(build_explainer("layercam", lite), crop=124, n=6, alpha=2.6)
    expected = finalize_maps(ucag(x).maps, rgb.shape[:2])[0, 0].numpy()
    assert np.allclose(np.load(tmp_path / "chelsea_layercam_ucag.npy"), expected, atol=1e-4)


def test_official_mode_and_fixed_target(tmp_path, capsys):
    code, _, err = run(["gradcam++", "--ucag", "--official", *FAST, "--target", "281",
                        "--img-path", str(EXAMPLES / "chelsea.jpg"), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    row = next(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert row["target"] == "281" and row["class"] == "tabby"
    blurred = np.load(tmp_path / "chelsea_gradcam++_ucag.npy")
    assert 0 <= blurred.min() and blurred.max() <= 1


def make_messy_folder(root):
    """Class sub-folders with grayscale, RGBA, palette, 16-bit, tiny and corrupt files."""
    (root / "n02123045").mkdir(parents=True)
    (root / "n07920052").mkdir()
    shutil.copy(EXAMPLES / "chelsea.jpg", root / "n02123045" / "cat.jpg")
    cat = load_rgb(EXAMPLES / "chelsea.jpg")
    Image.fromarray(cat).convert("L").save(root / "n02123045" / "gray.png")
    Image.fromarray(cat).convert("RGBA").save(root / "n02123045" / "alpha.png")
    Image.fromarray(cat).convert("P").save(root / "n07920052" / "palette.png")
    Image.fromarray(load_rgb(EXAMPLES / "camera.png")[..., 0].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(cat[:20, :30]).save(root / "tiny.png")
    (root / "n07920052" / "broken.jpg").write_bytes(b"\xff\xd8 not really")


def test_folder_run_converts_odd_images_and_skips_bad_ones(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    make_messy_folder(data)
    code, stdout, err = run(["xgradcam", "--ucag", *FAST, "--img-path", str(data), "--out", str(out),
                             "--batch-size", "4"], capsys)
    assert code == 0, err
    assert "skipped" in err + stdout and "broken.jpg" in (out / "skipped.txt").read_text()
    assert "smaller than a crop" in err + stdout
    for stem in ["n02123045/cat", "n02123045/gray", "n02123045/alpha", "n07920052/palette", "deep16", "tiny"]:
        assert (out / f"{stem}_xgradcam.png").exists() and (out / f"{stem}_xgradcam_ucag.npy").exists()
    assert np.load(out / "tiny_xgradcam.npy").shape == (20, 30)
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 6


def corrupt(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG garbage")
    return str(path)


def text_file(tmp_path) -> str:
    path = tmp_path / "weights.pth"
    path.write_text("these are not weights\n")
    return str(path)


def resnet18_weights(tmp_path) -> str:
    import torchvision
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


BAD_INPUTS = [
    (lambda t: ["gradcam", "--img-path", str(t / "missing")], "does not exist"),
    (lambda t: ["gradcam", "--img-path", str(t)], "no image files"),
    (lambda t: ["gradcam", "--img-path", corrupt(t)], "cannot read image"),
    (lambda t: ["gradcam", "--name", "resnet9000"], "unknown model 'resnet9000'; valid names: efficientnet_lite0"),
    (lambda t: ["gradcrap"], "unknown method 'gradcrap'; valid names: "),
    (lambda t: ["gradcam", "--ucag", "-n", "1"], "at least 2"),
    (lambda t: ["gradcam", "--ucag", "-a", "0"], "alpha must be positive"),
    (lambda t: ["gradcam", "--ucag", "-a", "-1"], "alpha must be positive"),
    (lambda t: ["gradcam", "--ucag", "-c", "300"], "crop-size must be in (0, 224]"),
    (lambda t: ["gradcam", "--ucag", "-c", "20", "-a", "0.5"], "below the 32 px"),
    (lambda t: ["gradcam", "--target", "1000"], "out of range"),
    (lambda t: ["gradcam", "--target", "cat"], "'pred' or a class index"),
    (lambda t: ["gradcam", "--weights", str(t / "nope.pth")], "weights file not found"),
    (lambda t: ["gradcam", "--target-layer", "nothere"], "target layer 'nothere' not found"),
    (lambda t: ["gradcam", "--batch-size", "0"], "batch-size must be at least 1"),
    (lambda t: ["gradcam", "--device", "tpu"], "device"),
    (lambda t: ["gradcam", "-n", "two"], "invalid int value"),
    (lambda t: ["gradcam", "--ucag", "-a", "inf"], "alpha must be positive and finite (got inf)"),
    (lambda t: ["gradcam", "--ucag", "-a", "nan"], "alpha must be positive and finite (got nan)"),
    (lambda t: ["gradcam", "--ucag", "-a", "1e6"], "would be 124000000 px, above the 4096 px limit"),
    (lambda t: ["gradcam", "--weights", text_file(t)], "not a PyTorch checkpoint saved with torch.save"),
    (lambda t: ["gradcam", "--weights", resnet18_weights(t)],
     "does not fit efficientnet_lite0: 296 missing: _conv_stem.weight, _bn0.weight, _bn0.bias, ... (296 in all); "
     "122 unexpected: conv1.weight, bn1.weight, bn1.bias"),
    (lambda t: ["gradcam", "--target-layer", "fc"], "target layer 'fc' gives output (1, 1000), not a spatial"),
    (lambda t: ["gradcam", "--target-layer", "dropout"], "target layer 'dropout' gives output (1, 1280)"),
]
if not torch.backends.mps.is_available():
    BAD_INPUTS.append((lambda t: ["gradcam", "--device", "mps"], "MPS backend is not available"))


@pytest.mark.parametrize("make_argv,message", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(make_argv, message, tmp_path, capsys):
    code, _, err = run(make_argv(tmp_path) + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line and not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("visualization.py: error: ")
    assert message in lines[0] and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(tmp_path, capsys):
    code, _, err = run(["gradcam", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no CUDA GPU is available" in err


def test_script_as_a_subprocess_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "visualization.py", "gradcam", "--ucag", "-n", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "visualization.py: error: -n/--num-patches must be an integer of at least 2 (got 1)"]


def test_method_options_reach_the_explainer_and_stray_flags_warn(tmp_path):
    import argparse
    import warnings as _warnings

    from app.flags import Parser, add_common_flags
    from app.setup import explainer_options
    parser = Parser(prog="t")
    add_common_flags(parser)
    args = parser.parse_args(["lrp", "--rule", "epsilon", "--steps", "8"])
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        assert explainer_options(args, "lrp") == {"rule": "epsilon"}
    assert any("--steps has no effect on lrp" in str(w.message) for w in caught)
    assert isinstance(args, argparse.Namespace)


def test_bad_method_option_is_one_line_error(tmp_path):
    import torchvision

    from methods import build_explainer
    from methods.errors import MethodError
    from models.spec import ModelSpec
    spec = ModelSpec("vgg11", torchvision.models.vgg11(), "features.19", [str(i) for i in range(1000)])
    with pytest.raises(MethodError, match="lrp: unknown LRP rule 'nope'"):
        build_explainer("lrp", spec, rule="nope")


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_output_folder_that_is_a_file_is_refused(where, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    out = blocker if where == "file" else blocker / "sub"
    code, _, err = run(["gradcam", "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert ("is a file; give a folder" if where == "file" else "which is a file") in err


def test_images_sharing_a_stem_keep_their_extension(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLES / "chelsea.jpg", data / "cat.jpg")
    shutil.copy(EXAMPLES / "camera.png", data / "cat.png")
    shutil.copy(EXAMPLES / "coffee.jpg", data / "cup.jpg")
    out = tmp_path / "out"
    code, stdout, err = run(["gradcam", *FAST, "--img-path", str(data), "--out", str(out)], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["cat_jpg_gradcam.npy", "cat_jpg_gradcam.png", "cat_png_gradcam.npy", "cat_png_gradcam.png",
                     "cup_gradcam.npy", "cup_gradcam.png", "predictions.csv", "skipped.txt"]
    assert "keep the extension" in err + stdout
    figures = [row["figure"] for row in csv.DictReader(open(out / "predictions.csv"))]
    assert len(set(figures)) == 3
    # the two cats are different pictures, so their maps differ
    assert np.load(out / "cat_jpg_gradcam.npy").shape != np.load(out / "cat_png_gradcam.npy").shape


def test_file_name_that_is_not_utf8(tmp_path, capsys):
    """A name with byte 0xE9 (Latin-1 e-acute): no crash in OpenCV, outputs under the exact name."""
    data = tmp_path / "data"
    data.mkdir()
    raw = bytes(data) + b"/caf\xe9.jpg"
    shutil.copy(EXAMPLES / "coffee.jpg", raw)
    out = tmp_path / "out"
    code, _, err = run(["gradcam", *FAST, "--img-path", str(data), "--out", str(out)], capsys)
    assert code == 0, err
    written = sorted(os.listdir(bytes(out)))
    assert b"caf\xe9_gradcam.npy" in written and b"caf\xe9_gradcam.png" in written
    assert "caf\\xe9.jpg" in (out / "predictions.csv").read_text(encoding="utf-8")  # escaped: valid UTF-8


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import errno

    def full(handle, array, *args, **kwargs):
        handle.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    out = tmp_path / "out"
    code, _, err = run(["gradcam", *FAST, "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "cannot write" in err and "No space left on device" in err
    assert not list(out.glob("*.npy")) and not list(out.glob(".*tmp"))


@pytest.mark.parametrize(("given", "expected"), [(None, 0), (3, 3), (0, 0)])
def test_decoding_workers_default_to_none_on_a_cpu(given, expected):
    """On a CPU the decoders would take the model's cores (and copy the pages it writes after the fork)."""
    from app.setup import build_setup
    argv = ["gradcam", "--device", "cpu"] + ([] if given is None else ["--workers", str(given)])
    args = visualization.build_parser().parse_args(argv)
    build_setup(args)
    assert args.workers == expected


def test_ucag_on_a_fixed_size_transformer_resizes_its_crops_and_says_so(tmp_path, capsys):
    """CaiT takes 224 x 224 only: the crops are resized to it instead of by alpha, a warning and the panel
    title say so, and the maps are written as for any model."""
    out = tmp_path / "out"
    resized = "takes 224x224 inputs only: UCAG's crops are resized to 224x224 instead of alpha \\* crop = 322x322"
    with pytest.warns(UserWarning, match=resized):
        code, stdout, err = run(["gradcam", "--ucag", "-n", "2", "--name", "timm:cait_xxs24_224", "--weights",
                                 "random", "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out),
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    assert (out / "coffee_gradcam_ucag.npy").is_file() and (out / "coffee_gradcam.png").is_file()
    assert "UCAG's crops go to the transformer at alpha * crop" not in stdout


def test_ucag_on_a_dynamic_size_transformer_says_how_it_takes_the_crops(tmp_path, capsys):
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, err = run(["gradcam", "--ucag", "-n", "2", "--name", "timm:vit_tiny_patch16_224", "--weights",
                                 "random", "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out),
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    assert not [w for w in caught if "inputs only" in str(w.message)]
    assert "UCAG's crops go to the transformer at alpha * crop" in stdout
    assert (out / "coffee_gradcam_ucag.npy").is_file()
