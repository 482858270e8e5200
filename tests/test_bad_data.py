"""Bad input to the data readers (issue 12): every bad item is skipped with a reason that reaches skipped.txt,
a file that is malformed as a whole is a one-line error, nothing is silent and nothing is a traceback."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from common.errors import ImageError
from common.images import MAX_PIXELS, display_path, find_images, load_rgb
from evaluation.data import ImageFiles
from evaluation.datasets import discover
from evaluation.distributed import Dist
from evaluation.driver import run_task
from evaluation.errors import DataError, EvaluationError
from evaluation.image_metric import load_sample
from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.localization_data import COCO2014, VOC2007, load_entry, read_difficult_list
from evaluation.reports import write_skipped
from evaluation.store import ResultStore
from evaluation.task import Task
from tests.conftest import EXAMPLES
from tests.localization_fixtures import coco_dataset, segmentation_file, voc_dataset

CAT, ESPRESSO = "n02124075", "n07920052"


def tiny(path: Path, size=(6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


class _LoadOnly(Task):
    """A task that only loads its items (each result an empty record) and writes skipped.txt."""

    def __init__(self, items, key, load):
        self._items, self._key, self._load = list(items), key, load

    @property
    def items(self):
        return self._items

    def key(self, item):
        return self._key(item)

    def load(self, item):
        return self._load(item)

    def process(self, batch):
        return [{"key": r["key"], "rows": {}} for r in batch]

    def summarize(self, records):
        return {}

    def write(self, out, records, skipped, summary):
        write_skipped(out / "skipped.txt", skipped)


def skipped_txt(out: Path, items, key, load, workers: int = 0) -> dict[str, str]:
    """Run ``load`` over ``items`` through the evaluation driver (DataLoader workers, store, skipped.txt) and
    return skipped.txt as {key: reason}."""
    task = _LoadOnly(items, key, load)
    try:
        run_task(task, ResultStore(out), Dist(), batch_size=2, workers=workers)
    except EvaluationError:
        pass  # every item skipped: skipped.txt is still written
    text = (out / "skipped.txt").read_text(encoding="utf-8")
    return dict(line.split("\t", 1) for line in text.splitlines())


# ---- image files: links, huge images, odd names ----------------------------------------------------------

def test_broken_and_looping_links_are_listed_and_skipped_with_a_reason(tmp_path):
    data = tmp_path / "data"
    tiny(data / "good.png")
    os.symlink("nowhere.jpg", data / "broken.jpg")
    os.symlink("loop_b.png", data / "loop_a.png")
    os.symlink("loop_a.png", data / "loop_b.png")
    os.symlink("..", data / "sub_loop")  # a directory link back to the parent: must not recurse forever
    os.symlink(".", data / "self_loop")
    files = find_images(data)
    assert [f.name for f in files] == ["broken.jpg", "good.png", "loop_a.png", "loop_b.png"]
    records = ImageFiles(files)
    assert records[1].image is not None
    assert "broken symbolic link" in records[0].error and "nowhere.jpg" in records[0].error
    assert "looping symbolic link" in records[2].error and "looping symbolic link" in records[3].error
    skipped = skipped_txt(tmp_path / "out", discover(data), lambda s: s.key, load_sample, workers=1)
    assert sorted(skipped) == ["broken.jpg", "loop_a.png", "loop_b.png"]
    assert "broken symbolic link" in skipped["broken.jpg"]
    # a single broken link given alone is an error, not an empty list
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_rgb(find_images(data / "broken.jpg")[0])


def test_linked_class_folders_are_walked_once(tmp_path):
    store = tmp_path / "store"
    tiny(store / CAT / "a.png")
    data = tmp_path / "val"
    data.mkdir()
    os.symlink(store / CAT, data / CAT)  # ImageNet val often holds links to class folders
    os.symlink(data, data / CAT / "back")  # and a loop through the link
    samples = discover(data, need_labels=True)
    assert [(s.key, s.label) for s in samples] == [(f"{CAT}/a.png", 285)]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 20000 x 10000 single-colour PNG (about 24 KB; 2e8 pixels, above MAX_PIXELS)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (20000, 10000)).save(path, optimize=True)
    return path


def test_decompression_bomb_is_an_image_error_naming_size_and_limit(bomb, tmp_path):
    assert 20000 * 10000 > MAX_PIXELS == 178_956_970
    with pytest.raises(ImageError, match=f"200000000 pixels, more than the limit of {MAX_PIXELS}"):
        load_rgb(bomb)
    data = tmp_path / "data"
    tiny(data / "a.png")
    shutil.copy(bomb, data / "b.png")
    skipped = skipped_txt(tmp_path / "out", discover(data), lambda s: s.key, load_sample)
    assert list(skipped) == ["b.png"] and "too large" in skipped["b.png"]


def test_over_the_limit_below_pillows_own_refusal(tmp_path, monkeypatch):
    """Our limit is checked on the header's size, whatever Pillow's threshold is."""
    monkeypatch.setattr("common.images.MAX_PIXELS", 23)
    with pytest.raises(ImageError, match="6 x 4 = 24 pixels, more than the limit of 23"):
        load_rgb(tiny(tmp_path / "a.png"))


def test_non_utf8_file_names(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    good, bad = os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"d\xe9j\xe0.jpg")
    try:
        tiny(folder / good)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    (folder / bad).write_bytes(b"not a jpeg")
    samples = discover(folder)
    assert [s.key for s in samples] == ["caf\\xe9.png", "d\\xe9j\\xe0.jpg"]
    assert all(s.key.encode("utf-8") for s in samples)  # printable keys: no surrogates
    assert load_rgb(samples[0].path).shape == (4, 6, 3)
    with pytest.raises(ImageError) as error:
        load_rgb(samples[1].path)
    assert "d\\xe9j\\xe0.jpg" in str(error.value)
    str(error.value).encode("utf-8")
    assert display_path(samples[1].path).endswith("d\\xe9j\\xe0.jpg")
    skipped = skipped_txt(tmp_path / "out", samples, lambda s: s.key, load_sample)
    assert list(skipped) == ["d\\xe9j\\xe0.jpg"]


# ---- ImageNet layouts and labels files -------------------------------------------------------------------

def class_folders(tmp_path) -> Path:
    root = tmp_path / "val"
    tiny(root / CAT / "a.JPEG")
    tiny(root / ESPRESSO / "b.JPEG")
    return root


def test_stray_file_in_class_folders_is_reported_and_targets_stay_ground_truth(tmp_path):
    root = class_folders(tmp_path)
    tiny(root / "stray.jpg")
    tiny(root / "misc" / "other.png")
    with pytest.warns(UserWarning, match=r"2 image file\(s\) .* outside the ImageNet class folders .* "
                                         r"misc/other.png, stray.jpg"):
        samples = discover(root)
    assert [(s.key, s.label) for s in samples] == [(f"{CAT}/a.JPEG", 285), (f"{ESPRESSO}/b.JPEG", 967)]
    with pytest.warns(UserWarning):
        assert [s.label for s in discover(root, need_labels=True)] == [285, 967]


def test_class_folders_alone_and_plain_folders_have_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.label for s in discover(class_folders(tmp_path))] == [285, 967]
        plain = tmp_path / "plain"
        tiny(plain / "x.png")
        assert discover(plain)[0].label is None
    with pytest.raises(DataError, match="--target gt needs ground truth"):
        discover(plain, need_labels=True)


def flat(tmp_path) -> Path:
    folder = tmp_path / "flat"
    tiny(folder / "ILSVRC2012_val_00000001.JPEG")
    tiny(folder / "ILSVRC2012_val_00000002.JPEG")
    return folder


def devkit(tmp_path, truth: bytes) -> Path:
    data = tmp_path / "devkit" / "data"
    data.mkdir(parents=True)
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array([(1, ESPRESSO, "espresso", "coffee", 0), (2, CAT, "Egyptian cat", "a cat", 0)], dtype=fields)
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    path = data / "ILSVRC2012_validation_ground_truth.txt"
    path.write_bytes(truth)
    return path


def test_labels_files_with_a_byte_order_mark_are_accepted(tmp_path):
    folder = flat(tmp_path)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "labels.txt").write_bytes(bom + b"967\n285\n")
    assert [s.label for s in discover(folder, tmp_path / "labels.txt")] == [967, 285]
    (tmp_path / "labels.csv").write_bytes(bom + b"file,label\nILSVRC2012_val_00000001.JPEG,967\n"
                                          b"ILSVRC2012_val_00000002.JPEG,285\n")
    assert [s.label for s in discover(folder, tmp_path / "labels.csv")] == [967, 285]
    assert [s.label for s in discover(folder, devkit(tmp_path, bom + b"1\r\n2\r\n"))] == [967, 285]


@pytest.mark.parametrize("name, content, message", [
    ("labels.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    ("labels.txt", b"967\n\xe9\xff\n", "is not UTF-8 text"),
    ("labels.csv", b"a.JPEG,1\n\x00\x01\x02", "is a binary file"),
])
def test_binary_or_undecodable_labels_file_is_one_error_naming_it(tmp_path, name, content, message):
    folder = flat(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"labels file .*{name} {message}"):
        discover(folder, tmp_path / name)


def test_devkit_non_integer_line_names_file_and_line(tmp_path):
    truth = devkit(tmp_path, b"1\n\ntwo\n")
    with pytest.raises(DataError, match=r"ILSVRC2012_validation_ground_truth.txt:3: 'two' is not an ILSVRC2012_ID"):
        discover(flat(tmp_path), truth)


@pytest.mark.parametrize("meta", [b"MATLAB 5.0 MAT-file garbage" + bytes(200), b"\x00" * 10, None])
def test_corrupt_meta_mat_is_one_error_naming_it(tmp_path, meta):
    truth = devkit(tmp_path, b"1\n2\n")
    meta_path = truth.parent / "meta.mat"
    if meta is None:  # a real .mat cut short
        meta_path.write_bytes(meta_path.read_bytes()[:300])
    else:
        meta_path.write_bytes(meta)
    with pytest.raises(DataError, match="cannot read the devkit's .*meta.mat"):
        discover(flat(tmp_path), truth)


def test_meta_mat_without_synsets(tmp_path):
    truth = devkit(tmp_path, b"1\n2\n")
    scipy.io.savemat(truth.parent / "meta.mat", {"other": np.arange(3)})
    with pytest.raises(DataError, match="cannot read the devkit's .*meta.mat.*KeyError"):
        discover(flat(tmp_path), truth)


# ---- Pascal VOC ------------------------------------------------------------------------------------------

def voc_with(tmp_path, annotations: dict[str, str]) -> VOC2007:
    """The fixture's VOC set plus images 000004... with the given XML bodies."""
    root = voc_dataset(tmp_path)
    voc = root / "VOC2007"
    ids = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()
    for image_id, body in annotations.items():
        shutil.copy(EXAMPLES / "chelsea.jpg", voc / "JPEGImages" / f"{image_id}.jpg")
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
        ids.append(image_id)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return VOC2007(root)


BOX = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>50</ymax></bndbox>"


def test_bad_voc_records_are_skipped_with_reasons(tmp_path):
    dataset = voc_with(tmp_path, {
        "000004": "<object><name>cat</name><difficult>0</difficult></object>",
        "000005": "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>one</ymin><xmax>9</xmax><ymax>9</ymax>"
                  "</bndbox></object>",
        "000006": "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax></bndbox></object>",
        "000007": f"<object><name>cat</name>{BOX}</object><object><name>unicorn</name>{BOX}</object>",
        "000008": "<object><name>cat</name><bndbox><xmin>nan</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
                  "</bndbox></object>",
        "000009": "<object><name>cat",
        "000010": f"<object><name>cat</name>{BOX}</object>",
    })
    (dataset.root / "JPEGImages" / "000010.jpg").unlink()  # a missing image: an ImageError, not a DataError
    (dataset.root / "Annotations" / "000003.xml").unlink()
    skipped = skipped_txt(tmp_path / "out", dataset.entries, lambda e: e.key, lambda e: load_entry(dataset, e),
                          workers=1)
    assert sorted(skipped) == ["000003", "000004", "000005", "000006", "000007", "000008", "000009", "000010"]
    assert "missing annotation file" in skipped["000003"]
    assert "000004.xml: object 1 ('cat') has no <bndbox>" in skipped["000004"]
    assert "<ymin> 'one' is not a number" in skipped["000005"]
    assert "<ymax> missing" in skipped["000006"]
    assert "object 2: class 'unicorn' is not a VOC class" in skipped["000007"]
    assert "<xmin> 'nan' is not a number" in skipped["000008"]
    assert "cannot parse" in skipped["000009"]
    assert "image file not found" in skipped["000010"]
    assert load_entry(dataset, dataset.entries[0])["targets"][0].label == 7  # the good images are unchanged


def test_all_difficult_voc_set_is_refused_with_the_reason(tmp_path):
    root = voc_dataset(tmp_path)
    voc = root / "VOC2007"
    for xml in (voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>"))
    with pytest.raises(DataError, match=r"no image of .*test.txt has an object to evaluate: of 3 image\(s\), 3 have "
                                        r"only 'difficult' objects"):
        VOC2007(root)
    (voc / "Annotations" / "000001.xml").write_text("<annotation></annotation>")
    (voc / "Annotations" / "000002.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"1 have only 'difficult' objects .*, 1 have none and 1 have a missing or bad"):
        VOC2007(root)


def test_unreadable_voc_split_file(tmp_path):
    root = voc_dataset(tmp_path)
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_bytes(b"\x00\x01\x02\xff")
    with pytest.raises(DataError, match="VOC split file .*test.txt is a binary file"):
        VOC2007(root)


def test_difficult_list_with_bom_and_binary(tmp_path):
    path = tmp_path / "difficult.txt"
    path.write_bytes(b"\xef\xbb\xbf000001\t0\t1\n")
    assert read_difficult_list(path, 2) == {"000001": [False, True]}
    path.write_bytes(b"000001\t0\t\xff\n")
    with pytest.raises(DataError, match="difficult list .* is not UTF-8 text"):
        read_difficult_list(path, 2)


# ---- COCO ------------------------------------------------------------------------------------------------

def coco_json(root: Path) -> Path:
    return root / "annotations" / "instances_val2014.json"


def test_bad_coco_records_are_skipped_with_reasons(tmp_path):
    root = coco_dataset(tmp_path)
    data = json.loads(coco_json(root).read_text())
    shutil.copy(EXAMPLES / "chelsea.jpg", root / "val2014" / "COCO_val2014_000000000004.jpg")
    shutil.copy(EXAMPLES / "chelsea.jpg", root / "val2014" / "COCO_val2014_000000000005.jpg")
    data["images"] += [{"id": 4, "file_name": "COCO_val2014_000000000004.jpg", "height": 300, "width": 451},
                       {"id": 5, "file_name": "COCO_val2014_000000000005.jpg", "height": 300, "width": 451},
                       {"id": 6, "height": 300, "width": 451},
                       {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": "tall", "width": 451},
                       {"id": 8, "file_name": "COCO_val2014_000000000008.jpg", "height": 300, "width": 451}]
    box, triangle = [10, 10, 20, 20], [[10, 10, 30, 10, 30, 30]]
    data["annotations"] += [
        {"id": 20, "image_id": 4, "category_id": 999, "iscrowd": 0, "bbox": box, "segmentation": triangle},
        {"id": 21, "image_id": 5, "category_id": 17, "iscrowd": 0, "bbox": box, "segmentation": "not a polygon"},
        {"id": 22, "image_id": 1, "iscrowd": 0, "bbox": box, "segmentation": triangle},
    ]
    coco_json(root).write_text(json.dumps(data))
    dataset = COCO2014(root)
    skipped = skipped_txt(tmp_path / "out", dataset.entries, lambda e: e.key, lambda e: load_entry(dataset, e),
                          workers=1)
    assert sorted(skipped) == ["COCO_val2014_000000000001", "COCO_val2014_000000000004", "COCO_val2014_000000000005",
                               "COCO_val2014_000000000007", "COCO_val2014_000000000008", "image id 6"]
    assert "category_id 999, not one of the file's categories" in skipped["COCO_val2014_000000000004"]
    assert "category_id None" in skipped["COCO_val2014_000000000001"]
    assert "annotation 21 of image COCO_val2014_000000000005 is malformed" in skipped["COCO_val2014_000000000005"]
    assert "has no file_name" in skipped["image id 6"]
    assert "no valid height and width" in skipped["COCO_val2014_000000000007"]
    assert "image file not found" in skipped["COCO_val2014_000000000008"]
    cup = load_entry(dataset, dataset.entries[1])["targets"]
    assert [t.label for t in cup] == [2] and cup[0].mask.sum() == 240 * 340  # good images unchanged


@pytest.mark.parametrize("content, message", [
    ("[]", "the top level is a JSON list, not an object"),
    ('{"images": [], "categories": []}', "'annotations' is missing or not a list"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 1, "category_id": 1}], "categories": []}', "has no 'image_id'"),
    ("{not json", "not JSON"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 1, "width": 1}], "annotations": [], '
     '"categories": [{"id": 1, "name": "x"}]}', "has no annotations"),
])
def test_malformed_coco_file_is_one_error(tmp_path, content, message):
    root = coco_dataset(tmp_path)
    coco_json(root).write_text(content)
    with pytest.raises(DataError, match=message):
        COCO2014(root)


# ---- ImageNet segmentation (gtsegs_ijcv.mat) -------------------------------------------------------------

def test_segmentation_file_holding_numbers_is_one_error(tmp_path):
    path = tmp_path / "numbers.mat"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("value/img", data=np.zeros((2, 1)))
        handle.create_dataset("value/gt", data=np.zeros((2, 1)))
    with pytest.raises(DataError, match="value/img holds float64 values, not object references"):
        ImageNetSegmentation(path)


def test_segmentation_file_with_mismatched_lengths(tmp_path):
    path = segmentation_file(tmp_path / "gtsegs_ijcv.mat")
    with h5py.File(path, "a") as handle:
        refs = handle["value/gt"][:1]
        del handle["value/gt"]
        handle.create_dataset("value/gt", data=refs)
    with pytest.raises(DataError, match="value/img holds 2 images but value/gt 1 masks"):
        ImageNetSegmentation(path)


def test_bad_segmentation_items_are_skipped_with_reasons(tmp_path):
    path = segmentation_file(tmp_path / "gtsegs_ijcv.mat")
    with h5py.File(path, "a") as handle:
        line = handle.create_dataset("#refs#/line", data=np.arange(5))
        handle["value/img"][0, 0] = line.ref  # image 0: a 1-D array
        gt = handle["value/gt"]
        handle["#refs#/gt1"][0, 0] = line.ref  # mask 1: a 1-D array
        assert gt.shape == (2, 1)
    dataset = ImageNetSegmentation(path)
    skipped = skipped_txt(tmp_path / "out", dataset.keys(), str, dataset.load, workers=1)
    assert "image 0 of gtsegs_ijcv.mat is a int64 array of shape (5,)" in skipped["00000"]
    assert "mask 1 of gtsegs_ijcv.mat is a int64 array of shape (5,)" in skipped["00001"]
