"""The pointing game against its reference, TorchRay 1.0.0.2 (a test-only peer).

TorchRay's ``PointingGame`` / ``PointingGameBenchmark`` (hit test, per-class counts, difficult subset,
class-mean accuracy), its ``resize_saliency`` (how the benchmark brings maps to the image size), its
center-baseline point and its VOC/COCO input transform are run side by side with ours on random maps,
masks, points and image sizes; agreement must be exact.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.datasets import VOCDetection

from evaluation.localization_data import VOC2007, VOC_CLASSES, read_difficult_list
from evaluation.pointing import (
    class_accuracies,
    explainer_point,
    in_difficult_subset,
    map_point,
    pointing_accuracy,
    pointing_hit,
)
from methods import finalize_maps
from methods.baselines import Center
from models.multilabel import CAFFE_MEAN, CAFFE_STD
from models.preprocessing import model_input_size, preprocess_one
from models.spec import ModelSpec

with warnings.catch_warnings():  # TorchRay 1.0.0.2 uses importlib.resources.open_text
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchray.attribution.common import resize_saliency
    from torchray.benchmark.models import get_transform
    from torchray.benchmark.pointing_game import PointingGame, PointingGameBenchmark

pytestmark = [pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),
              pytest.mark.filterwarnings("ignore:open_text is deprecated:DeprecationWarning")]


def torchray_hit(game: PointingGame, mask: np.ndarray, point_rc) -> bool:
    """TorchRay's verdict; its points are (u, v) = (col, row)."""
    return game.evaluate(torch.as_tensor(mask), (point_rc[1], point_rc[0])) == 1


def torchray_point(saliency: torch.Tensor) -> tuple[int, int]:
    """(row, col) of what TorchRay's benchmark script points at: argmax of the flattened (1, 1, H, W) map."""
    index = int(torch.argmax(saliency.reshape(-1)))
    return index // saliency.shape[-1], index % saliency.shape[-1]


def random_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Union of 1-3 random boxes, sometimes thin ones, sometimes a sprinkling of single pixels."""
    mask = np.zeros((height, width), bool)
    if rng.random() < 0.2:
        mask[rng.integers(0, height, 3), rng.integers(0, width, 3)] = True
        return mask
    for _ in range(rng.integers(1, 4)):
        top, left = rng.integers(0, height), rng.integers(0, width)
        bottom = min(height, top + rng.integers(1, max(2, height // 2)))
        right = min(width, left + rng.integers(1, max(2, width // 2)))
        mask[top:bottom, left:right] = True
    return mask


def test_hit_test_agrees_with_torchray_including_the_15_pixel_boundary():
    rng = np.random.default_rng(0)
    game = PointingGame(20)
    compared = boundary = hits = 0
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(16, 140, 2))
        mask = random_mask(rng, height, width)
        kind = rng.integers(0, 4)
        if kind == 0:  # a map maximum: integer pixel
            point = (int(rng.integers(0, height)), int(rng.integers(0, width)))
        elif kind == 1:  # the center baseline's half-pixel points
            point = (height / 2, width / 2)
        elif kind == 2:  # any real position
            point = (float(rng.uniform(-5, height + 5)), float(rng.uniform(-5, width + 5)))
        else:  # 15 px (Pythagorean or axis-aligned) from a mask pixel: the strict-inequality boundary
            row, col = np.argwhere(mask)[rng.integers(0, mask.sum())]
            d_row, d_col = [(15, 0), (0, 15), (9, 12), (12, 9), (14, 5)][rng.integers(0, 5)]
            point = (int(row) + int(rng.choice([-1, 1])) * d_row, int(col) + int(rng.choice([-1, 1])) * d_col)
            boundary += 1
        ours = pointing_hit(mask, point)
        assert ours == torchray_hit(game, mask, point), (height, width, point)
        compared += 1
        hits += ours
    assert compared == 400 and boundary > 50 and 50 < hits < 350


@pytest.mark.parametrize("shrink", [True, False])
def test_resized_maps_point_where_torchray_points(shrink):
    """Maps brought to the image size as TorchRay's benchmark does (``resize_saliency``, plain bilinear):
    same maximum, same hit; with the former anti-aliased shrink most noise maps move their maximum."""
    rng = np.random.default_rng(1 if shrink else 2)
    game = PointingGame(20)
    moved = 0
    for _ in range(120):
        height, width = (int(v) for v in rng.integers(20, 120, 2))
        if shrink:  # maps at the model input (shorter side 224) of an image smaller than that
            raw_size = (224, int(224 * width / height)) if width > height else (int(224 * height / width), 224)
        else:  # coarse CAM-like maps
            raw_size = tuple(int(v) for v in rng.integers(5, 20, 2))
        raw = torch.rand(1, 1, *raw_size, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
        if rng.random() < 0.5:  # smooth maps, not only noise
            raw = torch.nn.functional.avg_pool2d(raw, 5, 1, 2, count_include_pad=False)
        reference = resize_saliency(None, raw, (width, height), "bilinear")  # TorchRay takes (width, height)
        expected = torchray_point(reference)
        maps = finalize_maps(raw, (height, width), antialias=False)[:, 0]
        assert map_point(maps[0]) == expected
        mask = random_mask(rng, height, width)
        assert pointing_hit(mask, map_point(maps[0])) == torchray_hit(game, mask, expected)
        moved += map_point(finalize_maps(raw, (height, width))[0, 0]) != expected
    if shrink:
        assert moved > 60  # the anti-aliased default would not be the reference protocol here
    else:
        assert moved == 0  # upsampling: antialias changes nothing


def test_center_baseline_points_where_torchray_points():
    """TorchRay's center baseline is the point (w / 2, h / 2) of the image, half-pixel for odd sides."""
    rng = np.random.default_rng(3)
    game = PointingGame(20)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 20))
    center = Center(model)
    changed = 0
    for number in range(300):
        height, width = (int(v) for v in rng.integers(20, 140, 2))
        x = torch.zeros(1, 3, *model_input_size(height, width, keep_aspect_spec()))
        maps = finalize_maps(center(x, [0]).maps, (height, width), antialias=False)[:, 0]
        point = explainer_point(center, maps[0])
        w_half, h_half = torch.tensor([[width / 2, height / 2]])[0].tolist()  # the benchmark's point
        assert point == (h_half, w_half)
        if number % 2:  # a box corner 13..17 px from the centre: boundary cases
            mask = np.zeros((height, width), bool)
            row = int(math.floor(h_half)) + int(rng.integers(-17, 18))
            col = int(math.floor(w_half)) + int(rng.choice([-1, 1])) * int(rng.integers(10, 18))
            rows = slice(max(0, row), height) if rng.random() < 0.5 else slice(0, max(1, row + 1))
            cols = slice(max(0, col), width) if col > w_half else slice(0, max(1, col + 1))
            mask[rows, cols] = True
        else:
            mask = random_mask(rng, height, width)
        assert pointing_hit(mask, point) == torchray_hit(game, mask, point)
        changed += pointing_hit(mask, point) != pointing_hit(mask, map_point(maps[0]))
    assert changed > 0  # the map's pixel maximum alone would not be TorchRay's baseline


def keep_aspect_spec(caffe: bool = False) -> ModelSpec:
    statistics = dict(mean=CAFFE_MEAN, std=CAFFE_STD, resize_antialias=False) if caffe else {}
    return ModelSpec("toy", nn.Identity(), "", tuple(VOC_CLASSES), keep_aspect=True, multilabel=True, **statistics)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 375), (333, 500), (281, 500), (500, 301), (224, 224),
                                          (199, 301), (101, 99), (480, 640), (427, 640), (640, 425), (300, 451)])
def test_input_size_is_torchvisions_resize_224(height, width):
    expected = torchvision.transforms.Resize(224)(torch.zeros(3, height, width)).shape[-2:]
    assert model_input_size(height, width, keep_aspect_spec()) == tuple(expected)
    pil = torchvision.transforms.Resize(224)(Image.new("RGB", (width, height)))
    assert model_input_size(height, width, keep_aspect_spec()) == (pil.height, pil.width)


@pytest.mark.parametrize("height,width", [(375, 500), (500, 333), (150, 211)])
def test_caffe_input_is_torchrays_voc_transform(height, width):
    """TorchRay's benchmark transform for its VOC/COCO (Caffe) models, on the same uint8 image."""
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = get_transform(dataset="voc_2007", size=224)(Image.fromarray(image))
    spec = keep_aspect_spec(caffe=True)
    assert torch.equal(preprocess_one(image, spec, "cpu")[0], expected)
    spec = dataclasses.replace(spec, resize_antialias=True)  # what the Caffe models got before: not TorchRay's input
    if min(height, width) > 224:
        assert not torch.allclose(preprocess_one(image, spec, "cpu")[0], expected, atol=1.0)


def voc_annotation_xml(objects, width, height) -> str:
    body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                   f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for n, d, x0, y0, x1, y1 in objects)
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{body}</annotation>"


def torchray_label(name, objects, width, height) -> dict:
    """The same annotation as torchvision's VOCDetection hands it to TorchRay."""
    return {"annotation": {"filename": f"{name}.jpg", "size": {"width": str(width), "height": str(height)},
                           "object": [{"name": n, "difficult": str(d), "bndbox": {
                               "xmin": str(x0), "ymin": str(y0), "xmax": str(x1), "ymax": str(y1)}}
                               for n, d, x0, y0, x1, y1 in objects]}}


def test_per_class_counts_difficult_subset_and_accuracy_agree_with_torchray(tmp_path):
    """A random VOC test set (listed and unlisted images, Pascal-difficult boxes) through TorchRay's
    ``PointingGameBenchmark`` (all and EBP-difficult) and through our reader, hit test and aggregation."""
    shipped = importlib.resources.files("torchray.benchmark") / "pointing_game_ebp_voc07_difficult.txt"
    flags = read_difficult_list(str(shipped), 20)
    voc = VOCDetection.__new__(VOCDetection)  # TorchRay only checks the type; annotations are passed in
    all_game, difficult_game = PointingGameBenchmark(voc), PointingGameBenchmark(voc, difficult=True)
    assert flags == difficult_game.difficult_flags  # our reader reads TorchRay's file as TorchRay does

    rng = np.random.default_rng(4)
    listed = sorted(flags)
    names = [listed[int(i)] for i in rng.choice(len(listed), 150, replace=False)] + [f"9{i:05d}" for i in range(50)]
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(names) + "\n")
    labels = {}
    for name in names:
        height, width = (int(v) for v in rng.integers(40, 160, 2))
        objects = []
        for _ in range(rng.integers(1, 5)):
            x0, y0 = int(rng.integers(1, width)), int(rng.integers(1, height))
            x1, y1 = int(rng.integers(x0, width + 1)), int(rng.integers(y0, height + 1))
            # few classes so that some are missing from the difficult subset
            objects.append((VOC_CLASSES[int(rng.integers(0, 8))], int(rng.random() < 0.2), x0, y0, x1, y1))
        (root / "Annotations" / f"{name}.xml").write_text(voc_annotation_xml(objects, width, height))
        labels[name] = (torchray_label(name, objects, width, height), height, width)

    dataset = VOC2007(root)
    hits = {"all": {c: [] for c in range(20)}, "difficult": {c: [] for c in range(20)}}
    for entry in dataset.entries:
        label, height, width = labels[entry.key]
        targets = {t.label: t for t in dataset.targets(entry, height, width)}
        for class_id in {VOC_CLASSES.index(o["name"]) for o in label["annotation"]["object"]}:
            if rng.random() < 0.3:
                point = (height / 2, width / 2)  # center baseline
            else:
                point = (int(rng.integers(0, height)), int(rng.integers(0, width)))
            reference_all = all_game.evaluate(label, class_id, (point[1], point[0]))
            reference_difficult = difficult_game.evaluate(label, class_id, (point[1], point[0]))
            all_game.aggregate(reference_all, class_id)
            difficult_game.aggregate(reference_difficult, class_id)
            if class_id not in targets:  # all its boxes are Pascal-difficult: skipped by both
                assert reference_all == reference_difficult == 0
                continue
            hit = pointing_hit(targets[class_id].mask, point)
            assert reference_all == (1 if hit else -1)
            hits["all"][class_id].append(float(hit))
            if in_difficult_subset(flags, entry.key, class_id):
                hits["difficult"][class_id].append(float(hit))
                assert reference_difficult == reference_all
            else:
                assert reference_difficult == 0

    for subset, game in (("all", all_game), ("difficult", difficult_game)):
        assert [sum(v) for v in hits[subset].values()] == game.hits.tolist()
        assert [len(v) - sum(v) for v in hits[subset].values()] == game.misses.tolist()
        assert class_accuracies(hits[subset], 20).tolist() == game.class_accuracies.tolist()
        assert pointing_accuracy(hits[subset], 20) == pytest.approx(float(game.accuracy), rel=1e-15, abs=0)
    # the difficult subset leaves classes without pairs (TorchRay counts them as 0) and has unlisted images
    assert any(not v for v in hits["difficult"].values()) and difficult_game.hits.sum() > 0
    unlisted = [e.key for e in dataset.entries if e.key not in flags]
    assert len(unlisted) == 50 and all(in_difficult_subset(flags, key, 0) for key in unlisted)
    assert pointing_accuracy(hits["difficult"], 20, "evaluated-classes") > pointing_accuracy(hits["difficult"], 20)
