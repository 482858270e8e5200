"""Pointing-game datasets: Pascal VOC 2007 test and COCO 2014 val, plus the EBP "difficult" lists.

Each image yields its classes with what the games need, at the image's original size: the class mask
(VOC: union of the class's boxes; COCO: union of its instance masks, through pycocotools) and the box
mask (union of the class's boxes) for the energy game. VOC pairs whose boxes are all ``difficult`` are
skipped (TorchRay protocol).

Bad data: a file that is malformed as a whole (an unreadable split file, a COCO file whose top level is not
an object, a set in which no image has an evaluable object) is a :class:`DataError` when the dataset is
opened; a bad record (an unparsable XML, an object without ``<bndbox>`` or with a non-numeric coordinate, a
COCO annotation with an unknown ``category_id`` or a broken segmentation, a COCO image entry without a file
name or size, an unreadable image) makes :func:`load_entry` return that image with an ``error`` (one line of
``skipped.txt``), and the run goes on.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import ToolkitError
from common.images import display_path, load_rgb
from evaluation.datasets import read_text_file
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
    error: str | None = None  # why this image cannot be evaluated, known when the dataset is opened


@dataclass
class ClassTarget:
    """One (image, class) pair: class index, class mask, box mask (both bool, image size)."""

    label: int
    mask: np.ndarray
    boxes: np.ndarray
    extra: dict = field(default_factory=dict)


def box_pixels(box, height: int, width: int) -> tuple[int, int, int, int] | None:
    """The (top, left, bottom, right) pixel slice bounds of a 0-based inclusive (x0, y0, x1, y1) box clipped to
    the image; None when no pixel of the box lies in the image."""
    x0, y0, x1, y1 = box
    top, left = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
    bottom, right = min(height, int(np.ceil(y1)) + 1), min(width, int(np.ceil(x1)) + 1)
    return (top, left, bottom, right) if top < bottom and left < right else None


def boxes_mask(boxes: list[tuple[float, float, float, float]], height: int, width: int) -> np.ndarray:
    """Union of (x0, y0, x1, y1) boxes in 0-based pixel coordinates (x1, y1 inclusive), as rows x cols; each box
    clipped to the image."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        pixels = box_pixels(box, height, width)
        if pixels is not None:
            top, left, bottom, right = pixels
            mask[top:bottom, left:right] = True
    return mask


def _voc_objects(path: Path) -> list[tuple[int, list[float], bool]]:
    """The (class index, 0-based inclusive box, difficult) objects of one VOC XML; DataError names what is bad."""
    shown = display_path(path)
    if not path.is_file():
        raise DataError(f"missing annotation file {shown}")
    try:
        objects = ElementTree.parse(path).getroot().findall("object")
    except (ElementTree.ParseError, OSError) as exc:
        raise DataError(f"cannot parse {shown}: {exc}") from None
    result = []
    for number, obj in enumerate(objects, 1):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"{shown}: object {number}: class '{name[:40]}' is not a VOC class")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{shown}: object {number} ('{name}') has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = box.findtext(tag)
            try:
                value = float(text)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                found = "missing" if text is None else f"'{text.strip()[:20]}' is not a number"
                raise DataError(f"{shown}: object {number} ('{name}'): <{tag}> {found}")
            coords.append(value - 1)  # VOC boxes are 1-based and inclusive
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise DataError(f"{shown}: object {number} ('{name}'): box {[c + 1 for c in coords]} has xmax < xmin "
                            "or ymax < ymin")
        result.append((VOC_CLASSES.index(name), coords, (obj.findtext("difficult") or "0").strip() == "1"))
    return result


class VOC2007:
    """VOCdevkit/VOC2007 test: JPEGImages, Annotations (XML boxes with difficult flags), ImageSets/Main/test.txt."""

    name = "voc07"
    categories = VOC_CLASSES

    def __init__(self, root: str | Path, split: str = "test"):
        root = Path(root)
        candidates = [root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"]
        self.root = next((c for c in candidates if (c / "Annotations").is_dir()), None)
        if self.root is None:
            raise DataError(f"no VOC2007 folder (with Annotations/) at {display_path(root)}, "
                            f"{display_path(root / 'VOC2007')} or {display_path(root / 'VOCdevkit' / 'VOC2007')}")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"missing VOC split file {display_path(split_file)}")
        ids, first = [], {}
        for number, line in enumerate(read_text_file(split_file, "VOC split file").splitlines(), 1):
            if not line.strip():
                continue
            image_id = line.split()[0]
            if image_id in first:
                warnings.warn(f"{display_path(split_file)}:{number}: image {image_id} is listed again (first on line "
                              f"{first[image_id]}); it is evaluated once", stacklevel=2)
                continue
            first[image_id] = number
            ids.append(image_id)
        if not ids:
            raise DataError(f"{display_path(split_file)} lists no images")
        self.entries = [ImageEntry(i, self.root / "JPEGImages" / f"{i}.jpg", self.root / "Annotations" / f"{i}.xml")
                        for i in ids]
        self._check_evaluable(split_file)

    def _check_evaluable(self, split_file: Path) -> None:
        """Refuse a set in which no image has a non-difficult object (nothing to evaluate); stops at the first
        image that has one, so a real set costs one XML."""
        bad = difficult = 0
        for entry in self.entries:
            try:
                objects = _voc_objects(Path(entry.annotation))
            except DataError:
                bad += 1
                continue
            if any(not hard for _, _, hard in objects):
                return
            difficult += bool(objects)
        raise DataError(f"no image of {display_path(split_file)} has an object to evaluate: of {len(self.entries)} "
                        f"image(s), {difficult} have only 'difficult' objects (skipped, TorchRay protocol), "
                        f"{len(self.entries) - difficult - bad} have none and {bad} have a missing or bad annotation")

    def targets(self, entry: ImageEntry, height: int, width: int) -> list[ClassTarget]:
        """The image's classes, boxes clipped to the image; a box with no pixel in the image is skipped with a
        warning (a class left without a box, or with difficult boxes only, has no pair)."""
        boxes: dict[int, list] = {}
        difficult: dict[int, list] = {}
        for number, (label, coords, hard) in enumerate(_voc_objects(Path(entry.annotation)), 1):
            if box_pixels(coords, height, width) is None:
                warnings.warn(f"{display_path(Path(entry.annotation).name)}: object {number} "
                              f"('{VOC_CLASSES[label]}'): box {[round(c + 1, 2) for c in coords]} lies outside the "
                              f"{width}x{height} image; skipped", stacklevel=2)
                continue
            boxes.setdefault(label, []).append(coords)
            difficult.setdefault(label, []).append(hard)
        targets = []
        for label in sorted(boxes):
            if all(difficult[label]):
                continue
            mask = boxes_mask(boxes[label], height, width)
            targets.append(ClassTarget(label, mask, mask))
        return targets


def _unique_keys(entries: list[ImageEntry], shown: str) -> None:
    """Make the COCO entries' keys unique, as the store needs (one record per key): the file stem when no other
    image has it, else the file name (``dup.jpg``, ``dup.png``), else the file name and the image id."""
    before = [entry.key for entry in entries]
    for rename in (lambda e: e.path.name, lambda e: f"{e.key}#{e.annotation}"):
        counts = Counter(entry.key for entry in entries)
        for entry in entries:
            if counts[entry.key] > 1:
                entry.key = rename(entry)
    if len({entry.key for entry in entries}) < len(entries):
        raise DataError(f"{shown}: image entries whose file names and ids cannot be told apart")
    renamed = [entry.key for entry, key in zip(entries, before, strict=True) if entry.key != key]
    if renamed:
        warnings.warn(f"{len(renamed)} COCO image(s) share a file stem with another: their results are keyed by "
                      f"file name ({', '.join(renamed[:3])}{' ...' if len(renamed) > 3 else ''})", stacklevel=3)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class COCO2014:
    """COCO 2014 val: ``val2014/`` images and ``annotations/instances_val2014.json`` (pycocotools)."""

    name = "coco14"

    def __init__(self, root: str | Path, split: str = "val2014"):
        root = Path(root)
        annotation_file = root / "annotations" / f"instances_{split}.json"
        shown = display_path(annotation_file)
        if not annotation_file.is_file():
            raise DataError(f"missing COCO annotation file {shown}")
        from pycocotools.coco import COCO
        try:
            dataset = json.loads(read_text_file(annotation_file, "COCO annotation file"))
        except json.JSONDecodeError as exc:
            raise DataError(f"cannot read {shown}: not JSON ({exc})") from None
        if not isinstance(dataset, dict):
            raise DataError(f"{shown}: the top level is a JSON {type(dataset).__name__}, not an object with "
                            "'images', 'annotations' and 'categories'")
        for name in ("images", "annotations", "categories"):
            if not isinstance(dataset.get(name), list) or not all(isinstance(x, dict) for x in dataset[name]):
                raise DataError(f"{shown}: '{name}' is missing or not a list of objects")
        for name, records in (("images", dataset["images"]), ("categories", dataset["categories"]),
                              ("annotations", dataset["annotations"])):
            if any("id" not in r for r in records):
                raise DataError(f"{shown}: an entry of '{name}' has no 'id'")
        if any("image_id" not in a for a in dataset["annotations"]):
            raise DataError(f"{shown}: an entry of 'annotations' has no 'image_id'")
        for annotation in dataset["annotations"]:
            annotation.setdefault("category_id", None)  # an unknown category: its image is skipped (targets)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO()
                self.coco.dataset = dataset
                self.coco.createIndex()
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"cannot read {shown}: {exc.__class__.__name__}: {exc}") from None
        self.category_ids = sorted(self.coco.getCatIds())
        self.categories = [str(self.coco.loadCats(c)[0].get("name", c)) for c in self.category_ids]
        self.entries = []
        try:
            image_ids = sorted(self.coco.imgs)
        except TypeError:  # ids of mixed types
            image_ids = sorted(self.coco.imgs, key=str)
        for image_id in image_ids:
            info = self.coco.imgs[image_id]
            name, height, width = info.get("file_name"), info.get("height"), info.get("width")
            if not isinstance(name, str) or not name.strip():
                self.entries.append(ImageEntry(f"image id {image_id}", root / split, image_id,
                                               error=f"{shown}: image id {image_id} has no file_name"))
            elif not (_positive_int(height) and _positive_int(width)):
                self.entries.append(ImageEntry(Path(name).stem, root / split / name, image_id,
                                               error=f"{shown}: image {name[:80]} has no valid height and width "
                                                     f"({height!r:.20} x {width!r:.20})"))
            else:
                self.entries.append(ImageEntry(Path(name).stem, root / split / name, image_id, (height, width)))
        if not self.entries:
            raise DataError(f"{shown} lists no images")
        _unique_keys(self.entries, shown)
        if not dataset["annotations"]:
            raise DataError(f"{shown} has no annotations: no (image, class) pair to evaluate")

    def targets(self, entry: ImageEntry, height: int, width: int) -> list[ClassTarget]:
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=entry.annotation))
        by_class: dict[int, list] = {}
        for annotation in annotations:
            if annotation.get("category_id") not in self.coco.cats:
                raise DataError(f"annotation {annotation['id']} of image {entry.key} has category_id "
                                f"{annotation.get('category_id')!r:.20}, not one of the file's categories")
            by_class.setdefault(self.category_ids.index(annotation["category_id"]), []).append(annotation)
        targets = []
        for label in sorted(by_class):
            mask = np.zeros((height, width), dtype=bool)
            boxes = []
            for annotation in by_class[label]:
                try:
                    instance = self.coco.annToMask(annotation).astype(bool)
                    x, y, w, h = (float(v) for v in annotation["bbox"])
                except Exception as exc:  # noqa: BLE001 - pycocotools fails in many ways on a malformed record
                    raise DataError(f"annotation {annotation['id']} of image {entry.key} is malformed (segmentation "
                                    f"or bbox): {exc.__class__.__name__}: {str(exc)[:80]}") from None
                if not all(math.isfinite(v) for v in (x, y, w, h)):
                    raise DataError(f"annotation {annotation['id']} of image {entry.key} has a non-finite bbox")
                if instance.shape != mask.shape:
                    raise DataError(f"annotation size {instance.shape} of image {entry.key} differs from the image "
                                    f"{mask.shape}")
                mask |= instance
                boxes.append((x, y, x + w - 1, y + h - 1))
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
        raise DataError(f"difficult list not found: {display_path(path)}")
    flags = {}
    for number, line in enumerate(read_text_file(path, "difficult list").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != num_classes + 1 or any(p not in ("0", "1") for p in parts[1:]):
            raise DataError(f"{display_path(path)}:{number}: expected an image id and {num_classes} 0/1 flags")
        flags[parts[0]] = [p == "1" for p in parts[1:]]
    return flags


def load_entry(dataset, entry: ImageEntry) -> dict:
    """Decode an image and build its class targets (run in DataLoader workers); an unreadable image or a bad
    annotation record becomes ``{"key", "error"}`` (a skip record)."""
    if entry.error:
        return {"key": entry.key, "error": entry.error}
    try:
        image = load_rgb(entry.path)
        targets = dataset.targets(entry, *image.shape[:2])
    except ToolkitError as exc:
        return {"key": entry.key, "error": str(exc)}
    return {"key": entry.key, "entry": entry, "image": image, "targets": targets}
