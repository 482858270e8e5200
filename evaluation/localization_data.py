"""Pointing-game datasets: Pascal VOC 2007 test and COCO 2014 val, plus the EBP "difficult" lists.

Each image yields its classes with what the games need, at the image's original size: the class mask
(VOC: union of the class's boxes; COCO: union of its instance masks, through pycocotools) and the box
mask (union of the class's boxes) for the energy game. VOC pairs whose boxes are all ``difficult`` are
skipped (TorchRay protocol).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.images import load_rgb
from evaluation.errors import DataError

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


@dataclass
class ImageEntry:
    """One image of a localization dataset: id (file stem), path, and its annotation source."""

    key: str
    path: Path
    annotation: object = None
    size: tuple[int, int] | None = None


@dataclass
class ClassTarget:
    """One (image, class) pair: class index, class mask, box mask (both bool, image size)."""

    label: int
    mask: np.ndarray
    boxes: np.ndarray
    extra: dict = field(default_factory=dict)


def boxes_mask(boxes: list[tuple[float, float, float, float]], height: int, width: int) -> np.ndarray:
    """Union of (x0, y0, x1, y1) boxes in 0-based pixel coordinates (x1, y1 inclusive), as rows x cols."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        top, left = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
        bottom, right = min(height, int(np.ceil(y1)) + 1), min(width, int(np.ceil(x1)) + 1)
        mask[top:bottom, left:right] = True
    return mask


class VOC2007:
    """VOCdevkit/VOC2007 test: JPEGImages, Annotations (XML boxes with difficult flags), ImageSets/Main/test.txt."""

    name = "voc07"
    categories = VOC_CLASSES

    def __init__(self, root: str | Path, split: str = "test"):
        root = Path(root)
        candidates = [root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"]
        self.root = next((c for c in candidates if (c / "Annotations").is_dir()), None)
        if self.root is None:
            raise DataError(f"no VOC2007 folder (with Annotations/) at {root}, {root / 'VOC2007'} or "
                            f"{root / 'VOCdevkit' / 'VOC2007'}")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"missing VOC split file {split_file}")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"{split_file} lists no images")
        self.entries = [ImageEntry(i, self.root / "JPEGImages" / f"{i}.jpg", self.root / "Annotations" / f"{i}.xml")
                        for i in ids]

    def targets(self, entry: ImageEntry, height: int, width: int) -> list[ClassTarget]:
        path = Path(entry.annotation)
        if not path.is_file():
            raise DataError(f"missing annotation file {path}")
        try:
            objects = ElementTree.parse(path).getroot().findall("object")
        except ElementTree.ParseError as exc:
            raise DataError(f"cannot parse {path}: {exc}") from None
        boxes: dict[int, list] = {}
        difficult: dict[int, list] = {}
        for obj in objects:
            name = obj.findtext("name", "").strip()
            if name not in VOC_CLASSES:
                raise DataError(f"{path}: class '{name}' is not a VOC class")
            box = obj.find("bndbox")
            # VOC boxes are 1-based and inclusive
            coords = [float(box.findtext(tag)) - 1 for tag in ("xmin", "ymin", "xmax", "ymax")]
            label = VOC_CLASSES.index(name)
            boxes.setdefault(label, []).append(coords)
            difficult.setdefault(label, []).append(obj.findtext("difficult", "0").strip() == "1")
        targets = []
        for label in sorted(boxes):
            if all(difficult[label]):
                continue
            mask = boxes_mask(boxes[label], height, width)
            targets.append(ClassTarget(label, mask, mask))
        return targets


class COCO2014:
    """COCO 2014 val: ``val2014/`` images and ``annotations/instances_val2014.json`` (pycocotools)."""

    name = "coco14"

    def __init__(self, root: str | Path, split: str = "val2014"):
        root = Path(root)
        annotation_file = root / "annotations" / f"instances_{split}.json"
        if not annotation_file.is_file():
            raise DataError(f"missing COCO annotation file {annotation_file}")
        import contextlib
        import io

        from pycocotools.coco import COCO
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(annotation_file))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"cannot read {annotation_file}: {exc.__class__.__name__}: {exc}") from None
        self.category_ids = sorted(self.coco.getCatIds())
        self.categories = [self.coco.loadCats(c)[0]["name"] for c in self.category_ids]
        self.entries = []
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.loadImgs(image_id)[0]
            self.entries.append(ImageEntry(Path(info["file_name"]).stem, root / split / info["file_name"], image_id,
                                           (info["height"], info["width"])))
        if not self.entries:
            raise DataError(f"{annotation_file} lists no images")

    def targets(self, entry: ImageEntry, height: int, width: int) -> list[ClassTarget]:
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=entry.annotation))
        by_class: dict[int, list] = {}
        for annotation in annotations:
            by_class.setdefault(self.category_ids.index(annotation["category_id"]), []).append(annotation)
        targets = []
        for label in sorted(by_class):
            mask = np.zeros((height, width), dtype=bool)
            for annotation in by_class[label]:
                instance = self.coco.annToMask(annotation).astype(bool)
                if instance.shape != mask.shape:
                    raise DataError(f"annotation size {instance.shape} of image {entry.key} differs from the image "
                                    f"{mask.shape}")
                mask |= instance
            boxes = [(x, y, x + w - 1, y + h - 1) for x, y, w, h in (a["bbox"] for a in by_class[label])]
            targets.append(ClassTarget(label, mask, boxes_mask(boxes, height, width)))
        return targets


def open_dataset(name: str, root: str | Path):
    if name == "voc07":
        return VOC2007(root)
    if name == "coco14":
        return COCO2014(root)
    raise DataError(f"unknown dataset '{name}'; valid names: voc07, coco14")


def read_difficult_list(path: str | Path, num_classes: int) -> dict[str, list[bool]]:
    """EBP/TorchRay "difficult" flags: one line per image, ``<image id>\\t<flag class 0>...\\t<flag class K-1>``
    (tabs or spaces; flags 0/1; image id = file name without extension)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"difficult list not found: {path}")
    flags = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != num_classes + 1 or any(p not in ("0", "1") for p in parts[1:]):
            raise DataError(f"{path}:{number}: expected an image id and {num_classes} 0/1 flags")
        flags[parts[0]] = [p == "1" for p in parts[1:]]
    return flags


def load_entry(dataset, entry: ImageEntry) -> dict:
    """Decode an image and build its class targets (run in DataLoader workers)."""
    try:
        image = load_rgb(entry.path)
        targets = dataset.targets(entry, *image.shape[:2])
    except DataError as exc:
        return {"key": entry.key, "error": str(exc)}
    return {"key": entry.key, "entry": entry, "image": image, "targets": targets}
