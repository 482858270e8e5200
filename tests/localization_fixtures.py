"""Tiny datasets in the real layouts, built from the bundled photos with hand-drawn boxes and masks."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
from pycocotools import mask as mask_utils

from common.images import load_rgb
from tests.conftest import EXAMPLES


def voc_dataset(root):
    """VOCdevkit/VOC2007 with two test images: a cat (451x300) and a motorbike with a difficult person."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ["JPEGImages", "Annotations", "ImageSets/Main"]:
        (voc / sub).mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.jpg", voc / "JPEGImages" / "000001.jpg")
    shutil.copy(EXAMPLES / "motorcycle.jpg", voc / "JPEGImages" / "000002.jpg")
    shutil.copy(EXAMPLES / "coffee.jpg", voc / "JPEGImages" / "000003.jpg")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000003\n")

    def xml(objects):
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                       f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for n, d, x0, y0, x1, y1 in objects)
        return f"<annotation>{body}</annotation>"

    (voc / "Annotations" / "000001.xml").write_text(xml([("cat", 0, 61, 11, 400, 300)]))
    (voc / "Annotations" / "000002.xml").write_text(xml([("motorbike", 0, 101, 51, 700, 480),
                                                         ("person", 1, 1, 1, 50, 50)]))
    (voc / "Annotations" / "000003.xml").write_text(xml([("diningtable", 0, 1, 200, 600, 400),
                                                         ("bottle", 0, 150, 20, 450, 330)]))
    return root / "VOCdevkit"


def coco_dataset(root):
    """val2014 with two images; a cat as a polygon, a cup as RLE, a crowd annotation, one image without objects."""
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    names = {1: "COCO_val2014_000000000001.jpg", 2: "COCO_val2014_000000000002.jpg",
             3: "COCO_val2014_000000000003.jpg"}
    shutil.copy(EXAMPLES / "chelsea.jpg", root / "val2014" / names[1])
    shutil.copy(EXAMPLES / "coffee.jpg", root / "val2014" / names[2])
    shutil.copy(EXAMPLES / "camera.png", root / "val2014" / names[3])
    cup = np.zeros((400, 600), np.uint8, order="F")
    cup[60:300, 130:470] = 1
    rle = mask_utils.encode(np.asfortranarray(cup))
    rle["counts"] = rle["counts"].decode()
    annotations = {
        "images": [{"id": 1, "file_name": names[1], "height": 300, "width": 451},
                   {"id": 2, "file_name": names[2], "height": 400, "width": 600},
                   {"id": 3, "file_name": names[3], "height": 512, "width": 512}],
        "categories": [{"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 17, "iscrowd": 0, "area": 1.0, "bbox": [60, 10, 340, 290],
             "segmentation": [[60, 10, 400, 10, 400, 299, 60, 299]]},
            {"id": 11, "image_id": 2, "category_id": 47, "iscrowd": 1, "area": 1.0, "bbox": [130, 60, 340, 240],
             "segmentation": rle},
        ],
    }
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(annotations))
    return root


def segmentation_file(path, masks=None, images=None):
    """An HDF5 file in gtsegs_ijcv.mat's layout (value/img and value/gt object references); ``images``: (H, W, 3)
    arrays of any dtype instead of the two photos."""
    if images is None:
        images = [load_rgb(EXAMPLES / "chelsea.jpg"), load_rgb(EXAMPLES / "coffee.jpg")]
    if masks is None:
        masks = []
        for image in images:
            mask = np.zeros(image.shape[:2], np.uint8)
            mask[40:260, 90:380] = 1
            masks.append(mask)
    with h5py.File(path, "w") as handle:
        refs = handle.create_group("#refs#")
        image_refs, mask_refs = [], []
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            stored = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0))
            target = refs.create_dataset(f"mask{i}", data=mask.T)
            outer = refs.create_dataset(f"gt{i}", data=np.array([[target.ref]], dtype=h5py.ref_dtype))
            image_refs.append([stored.ref])
            mask_refs.append([outer.ref])
        handle.create_dataset("value/img", data=np.array(image_refs, dtype=h5py.ref_dtype))
        handle.create_dataset("value/gt", data=np.array(mask_refs, dtype=h5py.ref_dtype))
    return path
