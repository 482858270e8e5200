"""Pointing game, energy game, segmentation metrics and the localization readers."""
import math

import numpy as np
import pytest
import torch

from evaluation.errors import DataError
from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.localization_data import COCO2014, VOC2007, boxes_mask, read_difficult_list
from evaluation.pointing import (
    class_accuracies,
    class_mean,
    energy_score,
    explainer_point,
    in_difficult_subset,
    map_point,
    pointing_accuracy,
    pointing_hit,
)
from evaluation.segmentation_metrics import average_precision, image_scores, pixel_counts, threshold_maps
from methods.baselines import Center
from methods.postprocess import finalize_maps, resize_maps
from models.preprocessing import model_input_size
from models.spec import ModelSpec
from tests.localization_fixtures import coco_dataset, segmentation_file, voc_dataset


def test_fifteen_pixel_rule_at_its_boundary():
    mask = np.zeros((40, 60), bool)
    mask[10, 40] = True
    assert pointing_hit(mask, (10, 25.1))       # 14.9 px away
    assert not pointing_hit(mask, (10, 24.9))   # 15.1 px away
    assert not pointing_hit(mask, (10, 25.0))   # exactly 15: TorchRay counts distance < 15 only
    assert pointing_hit(mask, (10 + 14.9 / math.sqrt(2), 40 + 14.9 / math.sqrt(2)))  # diagonal 14.9
    assert not pointing_hit(mask, (10 + 15.1 / math.sqrt(2), 40 - 15.1 / math.sqrt(2)))
    assert not pointing_hit(np.zeros((5, 5), bool), (2, 2))


def test_map_point_is_row_col_of_the_maximum():
    saliency = torch.zeros(30, 50)
    saliency[7, 42] = 1
    assert map_point(saliency) == (7, 42)


def test_accuracy_is_a_class_mean_with_empty_classes_as_zero_by_default():
    # class 0: 9 of 10 hits, class 1: 0 of 2 hits, class 2: no pairs, class 3: absent from the dict.
    # Not the pooled accuracy over pairs (9 / 12).
    hits = {0: [1.0] * 9 + [0.0], 1: [0.0, 0.0], 2: []}
    assert class_accuracies(hits, 4).tolist() == [0.9, 0.0, 0.0, 0.0]
    assert pointing_accuracy(hits, 4) == pytest.approx(0.9 / 4)  # TorchRay: empty classes count as 0
    assert pointing_accuracy(hits, 4, "evaluated-classes") == pytest.approx((0.9 + 0.0) / 2)  # they are left out
    assert class_mean(hits) == pytest.approx((0.9 + 0.0) / 2)
    assert math.isnan(class_mean({0: []})) and math.isnan(pointing_accuracy({0: []}, 2, "evaluated-classes"))
    assert pointing_accuracy({0: []}, 2) == 0.0
    assert pointing_accuracy({1: [True, False]}, 2) == pytest.approx(0.25)  # booleans are fine
    with pytest.raises(ValueError, match="aggregation must be one of torchray, evaluated-classes"):
        pointing_accuracy(hits, 4, "pooled")
    with pytest.raises(ValueError, match="class 4 is outside 0..3"):
        pointing_accuracy({4: [1.0]}, 4)


def test_difficult_subset_membership():
    flags = {"000001": [False, True]}
    assert in_difficult_subset(flags, "000001", 1) and not in_difficult_subset(flags, "000001", 0)
    # an image missing from the list: in the subset as in TorchRay (only listed easy pairs are skipped) ...
    assert in_difficult_subset(flags, "000009", 0)
    # ... or, as an option, in 'all' only
    assert not in_difficult_subset(flags, "000009", 0, unlisted="all-only")
    assert not in_difficult_subset(None, "000001", 1)  # no list, no subset
    with pytest.raises(ValueError, match="unlisted must be one of difficult, all-only"):
        in_difficult_subset(flags, "000001", 1, unlisted="skip")


def test_center_baseline_points_at_torchrays_exact_centre():
    center = Center(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 3)))
    assert Center.pointing_point(375, 500) == (187.5, 250.0)  # TorchRay: (u, v) = (w / 2, h / 2)
    maps = center(torch.zeros(2, 3, 6, 8), [0, 1]).maps
    assert maps.shape == (2, 1, 6, 8) and map_point(maps[0, 0]) == (3, 4) and float(maps.min()) == 0.0
    assert float(maps[0, 0, 3, 4]) == 1.0 and float(maps[0, 0, 3, 3]) < 1.0
    saliency = torch.zeros(375, 500)
    assert explainer_point(center, saliency) == (187.5, 250.0)
    assert explainer_point(object(), saliency) == (0, 0)  # other explainers: the map's maximum
    mask = np.zeros((375, 500), bool)
    mask[202, 250] = True  # 14.5 px below the centre: a hit; from pixel (187, 249) it would be sqrt(226) px
    assert pointing_hit(mask, (187.5, 250.0)) and not pointing_hit(mask, (187, 249))
    odd = center(torch.zeros(1, 3, 5, 7), [0]).maps[0, 0]  # four pixels tie around (2.5, 3.5): top-left
    assert map_point(odd) == (2, 3) and float(odd[2, 3]) == float(odd[3, 4])


def test_pointing_resize_is_plain_bilinear():
    # shrinking 1 x 6 -> 1 x 2: plain bilinear (align_corners=False) samples x = 1.0 and 4.0 exactly
    raw = torch.tensor([[[[0.0, 1.0, 0.0, 0.0, 0.7, 0.7]]]])
    plain = resize_maps(raw, (1, 2), antialias=False)
    assert plain.flatten().tolist() == pytest.approx([1.0, 0.7])
    assert map_point(plain[0, 0]) == (0, 0)
    # the anti-aliased default averages 0.7, 0.7 into the right sample and moves the maximum
    assert map_point(resize_maps(raw, (1, 2))[0, 0]) == (0, 1)
    assert map_point(finalize_maps(raw, (1, 2), antialias=False)[0, 0]) == (0, 0)
    upsampled = torch.rand(1, 1, 4, 5)
    assert torch.equal(resize_maps(upsampled, (9, 11)), resize_maps(upsampled, (9, 11), antialias=False))


def test_multilabel_input_size_truncates_like_torchvision_resize():
    spec = ModelSpec("toy", torch.nn.Identity(), "", ["a"], keep_aspect=True)
    assert model_input_size(375, 500, spec) == (224, 298)  # 298.67: truncated, not rounded to 299
    assert model_input_size(500, 375, spec) == (298, 224)
    assert model_input_size(300, 300, spec) == (224, 224)
    assert model_input_size(375, 500, ModelSpec("toy", torch.nn.Identity(), "", ["a"])) == (224, 224)


def test_energy_score_by_hand():
    saliency = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.5, -2.0]])
    boxes = np.array([[False, True, False], [True, False, False]])
    assert energy_score(saliency, boxes) == pytest.approx(1.5 / 3.0)  # negative values do not count
    assert energy_score(torch.zeros(2, 3), boxes) == 0.0


def test_boxes_are_rasterised_as_x_then_y():
    mask = boxes_mask([(5, 1, 7, 2)], height=4, width=10)  # x 5..7, y 1..2
    assert mask.sum() == 6 and mask[1, 5] and mask[2, 7] and not mask[5 % 4, 1]
    assert np.argwhere(mask).tolist() == [[1, 5], [1, 6], [1, 7], [2, 5], [2, 6], [2, 7]]


def test_average_precision_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 0, 1, 0])
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # ties are one threshold: both tied items enter together (precision 1/2 at recall 1)
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert average_precision(torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0, 1, 1])) == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision(torch.tensor([0.3]), torch.tensor([0])))


def test_threshold_and_pixel_accuracy_by_hand():
    maps = torch.tensor([[[0.0, 0.2], [0.6, 1.0]]])
    truth = torch.tensor([[[0, 0], [1, -1]]])
    foreground = threshold_maps(maps, signed=False)  # mean 0.45
    assert foreground.tolist() == [[[False, False], [True, True]]]
    correct, labelled = pixel_counts(foreground, truth)
    assert correct.tolist() == [3] and labelled.tolist() == [3]
    assert threshold_maps(torch.tensor([[[-1.0, 0.5]]]), signed=True).tolist() == [[[False, True]]]
    correct, labelled, aps = image_scores(maps, truth, signed=False, protocol="map")
    assert aps[0] == pytest.approx(1.0)
    _, _, agf = image_scores(maps, truth, signed=False, protocol="agf")
    assert agf[0] == pytest.approx(1.0)


def test_voc_reader_skips_all_difficult_pairs_and_builds_box_masks(tmp_path):
    dataset = VOC2007(voc_dataset(tmp_path))
    assert [e.key for e in dataset.entries] == ["000001", "000002", "000003"]
    targets = dataset.targets(dataset.entries[1], 500, 741)
    assert [t.label for t in targets] == [13]  # motorbike; the all-difficult person is skipped
    mask = targets[0].mask
    assert mask[50, 100] and mask[479, 699] and not mask[49, 100] and not mask[50, 99] and not mask[480, 700]
    with pytest.raises(DataError, match="no VOC2007 folder"):
        VOC2007(tmp_path / "nowhere")


def test_coco_reader_polygon_rle_and_empty_image(tmp_path):
    dataset = COCO2014(coco_dataset(tmp_path))
    assert dataset.categories == ["person", "cat", "cup"]  # sorted by category id
    keys = [e.key for e in dataset.entries]
    assert keys == ["COCO_val2014_000000000001", "COCO_val2014_000000000002", "COCO_val2014_000000000003"]
    cat = dataset.targets(dataset.entries[0], 300, 451)
    assert [t.label for t in cat] == [1] and cat[0].mask[150, 200] and not cat[0].mask[5, 5]
    cup = dataset.targets(dataset.entries[1], 400, 600)
    assert cup[0].mask.sum() == 240 * 340 and cup[0].boxes[60, 130] and not cup[0].boxes[59, 130]
    assert dataset.targets(dataset.entries[2], 512, 512) == []
    with pytest.raises(DataError, match="missing COCO annotation file"):
        COCO2014(tmp_path / "nowhere")


def test_difficult_list_format(tmp_path):
    path = tmp_path / "difficult.txt"
    path.write_text("000001\t0\t1\n000002 1 0\n")
    assert read_difficult_list(path, 2) == {"000001": [False, True], "000002": [True, False]}
    path.write_text("000001\t0\n")
    with pytest.raises(DataError, match="expected an image id and 2 0/1 flags"):
        read_difficult_list(path, 2)


def test_imagenet_segmentation_reader(tmp_path):
    dataset = ImageNetSegmentation(segmentation_file(tmp_path / "gtsegs_ijcv.mat"))
    assert dataset.keys() == ["00000", "00001"]
    record = dataset.load("00001")
    assert record["image"].shape == (400, 600, 3) and record["mask"].shape == (400, 600)
    assert record["mask"][40, 90] and not record["mask"][39, 90]
    bogus = tmp_path / "bogus.mat"
    bogus.write_bytes(b"MATLAB 5.0 file, not HDF5")
    with pytest.raises(DataError, match="cannot open"):
        ImageNetSegmentation(bogus)
