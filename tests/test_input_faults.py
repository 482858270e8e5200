"""Inputs that used to give silently wrong results: outputs listed as inputs, COCO stems shared by two images,
VOC boxes outside the image, float images in gtsegs_ijcv.mat, a .mat file replaced under the same path."""
import csv
import json
import shutil
import warnings

import pytest

import insdel
import visualization
from app.cli import run_cli
from app.evaluation_run import output_folders
from common.images import find_images
from tests.conftest import EXAMPLES

INSDEL_FAST = ["--ucag", "-n", "2", "-a", "1.0", "-c", "180", "--workers", "0", "--device", "cpu",
               "--step", str(224 * 56)]


def run(module, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, argv, prog=module.PROG)
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def photos(folder, names=("chelsea.jpg", "coffee.jpg")):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(EXAMPLES / name, folder / name)
    return folder


# ---- outputs are never inputs ---------------------------------------------------------------------------

def test_insdel_out_inside_img_path_evaluates_the_same_images_on_a_rerun(tmp_path, capsys):
    data = photos(tmp_path / "data", ["chelsea.jpg"])
    out = data / "out"
    argv = ["gradcam", *INSDEL_FAST, "--img-path", str(data), "--out", str(out), "--target", "pred"]
    for _ in range(2):
        with pytest.warns(UserWarning, match="data/out is an output folder of this run"):
            code, _, err = run(insdel, argv, capsys)
        assert code == 0, err
        assert (out / "curves.png").is_file()
        assert json.loads((out / "summary.json").read_text())["n_images"] == 1
    assert len((out / "per_image.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize("script", [insdel, visualization])
def test_out_equal_to_img_path_is_refused(script, tmp_path, capsys):
    data = photos(tmp_path / "data")
    code, _, err = run(script, ["gradcam", "--img-path", str(data), "--out", str(tmp_path / "data" / ".")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "is the --img-path folder" in err
    assert sorted(p.name for p in data.iterdir()) == ["chelsea.jpg", "coffee.jpg"]


def test_visualization_out_inside_img_path_does_not_explain_its_own_panels(tmp_path, capsys):
    data = photos(tmp_path / "data")
    argv = ["gradcam", "-n", "3", "-a", "1.3", "--workers", "0", "--img-path", str(data), "--out",
            str(data / "maps")]
    for _ in range(2):
        code, stdout, err = run(visualization, argv, capsys)
        assert code == 0, err
        assert "over 2 image(s)" in stdout
        rows = list(csv.DictReader(open(data / "maps" / "predictions.csv")))
        assert [row["file"].rsplit("/", 1)[-1] for row in rows] == ["chelsea.jpg", "coffee.jpg"]
    assert not (data / "maps" / "maps").exists()


def test_output_folders_are_left_out_however_reached_and_the_default_results_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = photos(tmp_path)  # the working folder itself holds the images, results/ and the run's --out
    (tmp_path / "results" / "visualization").mkdir(parents=True)
    shutil.copy(EXAMPLES / "camera.png", tmp_path / "results" / "visualization" / "panel.png")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    shutil.copy(EXAMPLES / "camera.png", tmp_path / "runs" / "a" / "curves.png")
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = find_images(data, output_folders("runs/a", "."))
    assert [f.name for f in files] == ["chelsea.jpg", "coffee.jpg"]
    assert {str(w.message).split(" is an output")[0] for w in caught} == {str(tmp_path / "results"),
                                                                          str(tmp_path / "runs" / "a")}
    assert len(find_images(data)) == 4  # without outputs: everything
