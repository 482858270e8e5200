"""ImageNet layouts: class folders, flat folder + labels (devkit, text, CSV), plain folders."""
import shutil

import numpy as np
import pytest
import scipy.io

from evaluation.datasets import discover, imagenet_wnids, wnid_index
from evaluation.errors import DataError
from tests.conftest import EXAMPLES

CAT, ESPRESSO = "n02124075", "n07920052"


def test_wnid_order_is_torchvisions():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids)
    assert wnid_index("n01440764") == 0 and wnid_index(CAT) == 285 and wnid_index(ESPRESSO) == 967


def test_class_folders_even_when_only_some_classes_are_present(tmp_path):
    for wnid, name in [(CAT, "chelsea.jpg"), (ESPRESSO, "coffee.jpg")]:
        (tmp_path / wnid).mkdir()
        shutil.copy(EXAMPLES / name, tmp_path / wnid / name)
    samples = discover(tmp_path, need_labels=True)
    assert [(s.key, s.label) for s in samples] == [(f"{CAT}/chelsea.jpg", 285), (f"{ESPRESSO}/coffee.jpg", 967)]


def flat(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    shutil.copy(EXAMPLES / "coffee.jpg", folder / "ILSVRC2012_val_00000001.JPEG")
    shutil.copy(EXAMPLES / "chelsea.jpg", folder / "ILSVRC2012_val_00000002.JPEG")
    return folder


def test_flat_folder_with_index_wnid_and_csv_labels(tmp_path):
    folder = flat(tmp_path)
    (tmp_path / "labels.txt").write_text("967\n285\n")
    assert [s.label for s in discover(folder, tmp_path / "labels.txt")] == [967, 285]
    (tmp_path / "wnids.txt").write_text(f"ILSVRC2012_val_00000001.JPEG {ESPRESSO}\n"
                                        f"ILSVRC2012_val_00000002.JPEG {CAT}\n")
    assert [s.label for s in discover(folder, tmp_path / "wnids.txt")] == [967, 285]
    (tmp_path / "labels.csv").write_text(f"file,label\nILSVRC2012_val_00000002.JPEG,{CAT}\n"
                                         "ILSVRC2012_val_00000001.JPEG,967\n")
    assert [s.label for s in discover(folder, tmp_path / "labels.csv")] == [967, 285]


def test_devkit_ground_truth_through_meta_mat(tmp_path):
    folder = flat(tmp_path)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array([(1, ESPRESSO, "espresso", "coffee", 0), (2, CAT, "Egyptian cat", "a cat", 0),
                        (1001, "n00001740", "entity", "root", 2)], dtype=fields)
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    truth = data / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("1\n2\n")
    assert [s.label for s in discover(folder, truth)] == [967, 285]
    (data / "meta.mat").unlink()
    with pytest.raises(DataError, match="meta.mat"):
        discover(folder, truth)


def test_mismatched_and_bad_labels(tmp_path):
    folder = flat(tmp_path)
    (tmp_path / "short.txt").write_text("967\n")
    with pytest.raises(DataError, match="has 1 labels but .* holds 2 images"):
        discover(folder, tmp_path / "short.txt")
    (tmp_path / "partial.csv").write_text("ILSVRC2012_val_00000001.JPEG,1\n")
    with pytest.raises(DataError, match="no label for 1 of 2 images"):
        discover(folder, tmp_path / "partial.csv")
    (tmp_path / "range.txt").write_text("967\n1000\n")
    with pytest.raises(DataError, match="outside 0..999"):
        discover(folder, tmp_path / "range.txt")
    with pytest.raises(DataError, match="labels file not found"):
        discover(folder, tmp_path / "none.txt")


def test_name_label_text_lines_are_matched_by_name_not_by_position(tmp_path):
    folder = flat(tmp_path)
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000002.JPEG 285\nILSVRC2012_val_00000001.JPEG 967\n")
    assert [(s.key, s.label) for s in discover(folder, tmp_path / "val.txt")] == [
        ("ILSVRC2012_val_00000001.JPEG", 967), ("ILSVRC2012_val_00000002.JPEG", 285)]
    (tmp_path / "other.txt").write_text("ILSVRC2012_val_00000001.JPEG 967\nsomething_else.JPEG 285\n")
    with pytest.raises(DataError, match="no label for 1 of 2 images .first: ILSVRC2012_val_00000002.JPEG"):
        discover(folder, tmp_path / "other.txt")
    (tmp_path / "mixed.txt").write_text("ILSVRC2012_val_00000001.JPEG 967\n\n285\n")
    with pytest.raises(DataError, match=r"mixed.txt:3: expected a file name and a label like line 1, got '285'"):
        discover(folder, tmp_path / "mixed.txt")
    (tmp_path / "plain.txt").write_text("967\nILSVRC2012_val_00000002.JPEG 285\n")
    with pytest.raises(DataError, match=r"plain.txt:2: expected one label like line 1"):
        discover(folder, tmp_path / "plain.txt")


def test_an_image_listed_twice_with_two_classes_is_refused_naming_both_lines(tmp_path):
    folder = flat(tmp_path)
    (tmp_path / "twice.csv").write_text("file,label\n# comment\nILSVRC2012_val_00000001.JPEG,967\n"
                                        "ILSVRC2012_val_00000002.JPEG,285\nILSVRC2012_val_00000001.JPEG,1\n")
    with pytest.raises(DataError, match=r"twice.csv:3 and .*twice.csv:5 give ILSVRC2012_val_00000001.JPEG two "
                                        r"classes \(967 and 1\)"):
        discover(folder, tmp_path / "twice.csv")
    (tmp_path / "twice.txt").write_text("ILSVRC2012_val_00000001.JPEG 967\nILSVRC2012_val_00000001.JPEG 3\n"
                                        "ILSVRC2012_val_00000002.JPEG 285\n")
    with pytest.raises(DataError, match=r"twice.txt:1 and .*twice.txt:2 give"):
        discover(folder, tmp_path / "twice.txt")
    # the same class twice changes no number: accepted
    (tmp_path / "same.csv").write_text(f"ILSVRC2012_val_00000001.JPEG,967\nILSVRC2012_val_00000001.JPEG,{ESPRESSO}\n"
                                       "ILSVRC2012_val_00000002.JPEG,285\n")
    assert [s.label for s in discover(folder, tmp_path / "same.csv")] == [967, 285]


def test_a_bare_file_name_held_by_two_sub_folders_is_refused_a_relative_path_is_not(tmp_path):
    root = tmp_path / "data"
    for sub, photo in [("a", "chelsea.jpg"), ("b", "coffee.jpg")]:
        (root / sub).mkdir(parents=True)
        shutil.copy(EXAMPLES / photo, root / sub / "img.jpg")
    (tmp_path / "bare.csv").write_text("img.jpg,285\n")
    with pytest.raises(DataError, match=r"bare.csv:1: 'img.jpg' names 2 images \(a/img.jpg, b/img.jpg\); give the "
                                        "path relative to"):
        discover(root, tmp_path / "bare.csv")
    (tmp_path / "paths.csv").write_text("b/img.jpg,967\n./a/img.jpg,285\n")
    assert [(s.key, s.label) for s in discover(root, tmp_path / "paths.csv")] == [("a/img.jpg", 285),
                                                                                  ("b/img.jpg", 967)]
    (tmp_path / "unique.csv").write_text("img.jpg,285\n")  # a name held by one image matches it
    assert [s.label for s in discover(root / "a", tmp_path / "unique.csv")] == [285]


def test_plain_folder_targets_are_predictions(tmp_path):
    samples = discover(EXAMPLES)
    assert all(s.label is None for s in samples) and len(samples) == 4
    with pytest.raises(DataError, match="--target gt needs ground truth"):
        discover(EXAMPLES, need_labels=True)
