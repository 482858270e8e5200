"""Inputs that used to give silently wrong results: outputs listed as inputs, COCO stems shared by two images,
VOC boxes outside the image, float images in gtsegs_ijcv.mat, a .mat file replaced under the same path."""
import csv
import json
import re
import shutil
import warnings

import numpy as np
import pytest

import insdel
import pointing_game
import segmentation
import visualization
from app.evaluation_run import output_folders
from app.lifecycle import run_cli
from common.images import find_images, load_rgb
from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.localization_data import COCO2014, VOC2007, boxes_mask
from tests.conftest import EXAMPLES
from tests.localization_fixtures import coco_dataset, segmentation_file, voc_dataset

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


# ---- localization keys ----------------------------------------------------------------------------------

def coco_with_shared_stem(root):
    """The tiny COCO set plus dup.jpg (a cat) and dup.png (a cup), both annotated."""
    coco_dataset(root)
    shutil.copy(EXAMPLES / "chelsea.jpg", root / "val2014" / "dup.jpg")
    shutil.copy(EXAMPLES / "coffee.jpg", root / "val2014" / "dup.png")
    path = root / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["images"] += [{"id": 4, "file_name": "dup.jpg", "height": 300, "width": 451},
                       {"id": 5, "file_name": "dup.png", "height": 400, "width": 600}]
    data["annotations"] += [
        {"id": 20, "image_id": 4, "category_id": 17, "iscrowd": 0, "area": 1.0, "bbox": [60, 10, 340, 290],
         "segmentation": [[60, 10, 400, 10, 400, 299, 60, 299]]},
        {"id": 21, "image_id": 5, "category_id": 47, "iscrowd": 0, "area": 1.0, "bbox": [130, 60, 340, 240],
         "segmentation": [[130, 60, 470, 60, 470, 299, 130, 299]]}]
    path.write_text(json.dumps(data))
    return root


def test_coco_images_sharing_a_stem_get_unique_keys(tmp_path):
    with pytest.warns(UserWarning, match=r"2 COCO image\(s\) share a file stem .*\(dup.jpg, dup.png\)"):
        dataset = COCO2014(coco_with_shared_stem(tmp_path))
    assert [e.key for e in dataset.entries] == ["COCO_val2014_000000000001", "COCO_val2014_000000000002",
                                                "COCO_val2014_000000000003", "dup.jpg", "dup.png"]
    # the same file name under two ids: the id tells them apart
    path = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["images"][4]["file_name"] = "dup.jpg"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="share a file stem"):
        keys = [e.key for e in COCO2014(tmp_path).entries]
    assert keys[3:] == ["dup.jpg#4", "dup.jpg#5"]


def test_pointing_game_evaluates_and_merges_both_images_sharing_a_stem(tmp_path, capsys):
    root = coco_with_shared_stem(tmp_path / "coco")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(pointing_game, ["center", "--workers", "0", "--device", "cpu", "--dataset", "coco14",
                                           "--data-root", str(root), "--weights", "random", "--out", str(out)],
                           capsys)
    assert code == 0, err
    assert any("share a file stem" in str(w.message) for w in caught)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 5 and summary["n_pairs"] == 4


def test_voc_image_listed_twice_in_the_split_is_evaluated_once(tmp_path):
    root = voc_dataset(tmp_path)
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000001\n000003\n")
    with pytest.warns(UserWarning, match=r"test.txt:3: image 000001 is listed again \(first on line 1\)"):
        dataset = VOC2007(root)
    assert [e.key for e in dataset.entries] == ["000001", "000002", "000003"]


def voc_with_boxes_outside(tmp_path):
    """The tiny VOC set; in 000001 (451x300) a cat inside, a dog right of the image, a bird above-left of it
    (negative coordinates) and a person whose only box lies below the image."""
    root = voc_dataset(tmp_path)
    objects = [("cat", 61, 11, 400, 300), ("dog", 460, 10, 500, 100), ("bird", -60, -40, -10, -5),
               ("person", 10, 301, 40, 400)]
    body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                   f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for n, x0, y0, x1, y1 in objects)
    (root / "VOC2007" / "Annotations" / "000001.xml").write_text(f"<annotation>{body}</annotation>")
    return root


def test_voc_boxes_outside_the_image_are_skipped_with_a_reason(tmp_path):
    dataset = VOC2007(voc_with_boxes_outside(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targets = dataset.targets(dataset.entries[0], 300, 451)
    assert [dataset.categories[t.label] for t in targets] == ["cat"]
    notes = [str(w.message) for w in caught]
    assert notes == ["000001.xml: object 2 ('dog'): box [460.0, 10.0, 500.0, 100.0] lies outside the 451x300 image; "
                     "skipped",
                     "000001.xml: object 3 ('bird'): box [-60.0, -40.0, -10.0, -5.0] lies outside the 451x300 image; "
                     "skipped",
                     "000001.xml: object 4 ('person'): box [10.0, 301.0, 40.0, 400.0] lies outside the 451x300 image; "
                     "skipped"]
    # a box beyond the top-left corner marks no pixel (a negative slice end once marked nearly the whole image)
    assert not boxes_mask([(-61.0, -41.0, -11.0, -6.0)], 300, 451).any()
    assert boxes_mask([(440.0, 290.0, 900.0, 900.0)], 300, 451).sum() == 11 * 10  # clipped to the image


def test_pointing_game_does_not_count_a_box_outside_the_image_as_a_miss(tmp_path, capsys):
    root = voc_with_boxes_outside(tmp_path / "data")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(pointing_game, ["center", "--workers", "0", "--device", "cpu", "--dataset", "voc07",
                                           "--data-root", str(root), "--weights", "random", "--aggregation",
                                           "evaluated-classes", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    # the centre hits every box inside these images: cat, motorbike, diningtable, bottle
    assert summary["n_pairs"] == 4 and summary["rows"][0]["pointing_all"] == pytest.approx(100.0)
    assert sum("lies outside" in str(w.message) for w in caught) == 3


# ---- gtsegs_ijcv.mat ------------------------------------------------------------------------------------

def test_segmentation_images_are_converted_by_dtype(tmp_path):
    photo = load_rgb(EXAMPLES / "chelsea.jpg")
    for stored in [photo / 255.0, (photo / 255.0).astype(np.float32), photo.astype(np.float64),
                   photo.astype(np.uint16), photo.astype(np.int32)]:
        path = segmentation_file(tmp_path / f"{stored.dtype}_{stored.max():g}.mat", images=[stored, photo])
        record = ImageNetSegmentation(path).load("00000")
        assert "error" not in record, record
        assert record["image"].dtype == np.uint8 and np.array_equal(record["image"], photo)


@pytest.mark.parametrize("stored, reason", [
    (lambda p: p.astype(np.float64) * 2, r"holds float64 values in \[0, 436\], neither \[0, 1\] nor \[0, 255\]"),
    (lambda p: p / 255.0 - 0.5, r"holds float64 values in \[-0.5, 0.3549"),
    (lambda p: np.where(p > 100, np.nan, p / 255.0), "holds non-finite float64 values"),
    (lambda p: p.astype(np.int16) * 10, r"holds int16 values in \[0, 2180\]"),
    (lambda p: p > 100, "is a bool array"),
], ids=["float-0-436", "float-negative", "float-nan", "int16-0-2180", "bool"])
def test_segmentation_image_of_unknown_scale_is_skipped_with_the_reason(tmp_path, stored, reason):
    photo = load_rgb(EXAMPLES / "chelsea.jpg")
    dataset = ImageNetSegmentation(segmentation_file(tmp_path / "gtsegs_ijcv.mat", images=[stored(photo), photo]))
    record = dataset.load("00000")
    assert set(record) == {"key", "error"}
    assert re.search(f"image 0 of gtsegs_ijcv.mat {reason}", record["error"]), record["error"]
    assert "error" not in dataset.load("00001")


def test_a_mat_file_replaced_under_the_same_path_is_not_resumed(tmp_path, capsys):
    data = segmentation_file(tmp_path / "gtsegs_ijcv.mat")
    out = tmp_path / "out"
    argv = ["gradcam", "-n", "2", "-a", "1.0", "-c", "180", "--workers", "0", "--device", "cpu", "--data",
            str(data), "--limit", "1", "--out", str(out)]
    assert run(segmentation, argv, capsys)[0] == 0
    shutil.copy(data, tmp_path / "copy.mat")
    shutil.copy(tmp_path / "copy.mat", data)  # the same content, a new mtime: resumed
    code, stdout, err = run(segmentation, argv, capsys)
    assert code == 0, err
    other = np.zeros((300, 451), np.uint8)
    other[:10, :10] = 1
    segmentation_file(data, masks=[other, np.ones((400, 600), np.uint8)])
    code, _, err = run(segmentation, argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert "holds results of other settings (data_hash: 'sha256:" in err
