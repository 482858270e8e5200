"""Which images to evaluate and their ground-truth classes.

Layouts: ImageNet val as class folders (``n01440764/*.JPEG``; index = position of the wnid in the
standard sorted list of the 1000 ImageNet wnids, torchvision's class order), a flat folder plus a labels
file (the devkit's ``ILSVRC2012_validation_ground_truth.txt`` with ``meta.mat`` beside it, a text file
with one class index or wnid per line in sorted file-name order, a text file of ``name label`` lines or a CSV
``file,label``), or any folder of images (no labels: the target is the model's prediction).

A labels file matches the images exactly or is refused naming the line: ``name label`` lines and CSV rows are
matched by the image's path relative to the folder, or by its file name when no other image has it; an image
given two different classes, a name held by several images, or an image without a label is a DataError.

Layout detection never changes the target silently: image files outside the class folders of a class-folder
tree are left out with a warning naming them, and ``need_labels`` without usable labels is an error. Keys
are the paths relative to the folder, printable (:func:`common.images.display_path`).
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common.images import display_path, find_image_names
from evaluation.errors import DataError

WNID = re.compile(r"^n\d{8}$")
RESOURCES = Path(__file__).resolve().parent / "resources"


@dataclass(frozen=True)
class Sample:
    """One image to evaluate: its path, a stable key for results, and its label (None: unknown)."""

    path: Path
    key: str
    label: int | None = None


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in the standard (sorted, torchvision) class order."""
    return tuple((RESOURCES / "imagenet_wnids.txt").read_text().split())


@lru_cache(maxsize=1)
def _wnid_positions() -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


def wnid_index(wnid: str) -> int:
    """The class index of an ImageNet-1k wnid (its position in the sorted list; a dict lookup)."""
    try:
        return _wnid_positions()[wnid]
    except KeyError:
        raise DataError(f"'{wnid}' is not one of the 1000 ImageNet-1k wnids") from None


def _parse_label(text: str, where: str, num_classes: int) -> int:
    text = text.strip()
    if WNID.match(text):
        return wnid_index(text)
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: label '{text}' is neither a class index nor a wnid") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: class index {label} is outside 0..{num_classes - 1}")
    return label


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file (a leading byte-order mark is accepted); a binary or undecodable file is a DataError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {what} {display_path(path)}: {exc.strerror}") from None
    if b"\0" in data:
        raise DataError(f"{what} {display_path(path)} is a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {display_path(path)} is not UTF-8 text (byte {exc.start})") from None


def _devkit_labels(path: Path) -> list[int]:
    """ILSVRC2012_IDs (1-based, devkit order) -> torchvision indices through the devkit's meta.mat."""
    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(f"{path.name} holds devkit ILSVRC2012_IDs; their mapping needs {display_path(meta)} "
                        "(the devkit's data/meta.mat) beside it")
    import scipy.io
    try:
        synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
        # leaf synsets (num_children == 0) are the 1000 classes: (ILSVRC2012_ID, WNID, ...)
        index_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a corrupt or foreign .mat file
        raise DataError(f"cannot read the devkit's {display_path(meta)} (a corrupt or foreign meta.mat): "
                        f"{exc.__class__.__name__}: {exc}") from None
    labels = []
    for number, line in enumerate(read_text_file(path, "labels file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ilsvrc_id = int(line)
        except ValueError:
            raise DataError(f"{display_path(path)}:{number}: '{line.strip()[:40]}' is not an ILSVRC2012_ID "
                            "(an integer)") from None
        if ilsvrc_id not in index_to_wnid:
            raise DataError(f"{display_path(path)}:{number}: ILSVRC2012_ID {ilsvrc_id} not in meta.mat")
        labels.append(wnid_index(index_to_wnid[ilsvrc_id]))
    return labels


def _csv_entries(labels_file: Path, shown: str) -> list[tuple[int, str, str]]:
    """(line number, file, label) of each row of a ``file,label`` CSV (a header row and ``#`` lines skipped)."""
    reader = csv.reader(read_text_file(labels_file, "labels file").splitlines())
    entries: list[tuple[int, str, str]] = []
    try:
        for row in reader:
            if not row or row[0].startswith("#"):
                continue
            if not entries and row[0].strip().lower() in ("file", "filename", "image", "path"):
                continue
            if len(row) < 2:
                raise DataError(f"{shown}:{reader.line_num}: expected 'file,label'")
            entries.append((reader.line_num, row[0].strip(), row[1]))
    except csv.Error as exc:
        raise DataError(f"labels file {shown} is not a readable CSV: {exc}") from None
    return entries


def _text_entries(labels_file: Path, shown: str) -> tuple[list[tuple[int, str, str]], bool]:
    """The lines of a text labels file as (line number, file name, label) and whether they name files:
    ``name label`` lines (matched by name) or one label per line (matched by sorted position, name '')."""
    lines = [(n, line.strip()) for n, line in enumerate(read_text_file(labels_file, "labels file").splitlines(), 1)
             if line.strip()]
    named = bool(lines) and len(lines[0][1].split()) > 1
    entries = []
    for number, line in lines:
        if (len(line.split()) > 1) != named:
            raise DataError(f"{shown}:{number}: expected {'a file name and a label' if named else 'one label'} "
                            f"like line {lines[0][0]}, got '{line[:60]}'")
        name, label = line.rsplit(None, 1) if named else ("", line)
        entries.append((number, name.strip(), label))
    return entries, named


def _match_by_name(entries: list[tuple[int, str, str]], files: list[Path], root: Path, shown: str,
                   num_classes: int) -> list[int]:
    """Each image's label from the entries naming it: by its path relative to ``root``, or by its file name when
    no other image has that name. A name shared by several images, an image given two classes, or an image
    without an entry is a DataError naming the line(s). Entries naming no image here are ignored (a labels file
    of the whole set serves a part of it)."""
    relative = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
    by_name: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_name.setdefault(f.name, []).append(i)
    labels: list[int | None] = [None] * len(files)
    lines: list[int] = [0] * len(files)
    for number, name, text in entries:
        label = _parse_label(text, f"{shown}:{number}", num_classes)
        name = name.removeprefix("./")
        index = relative.get(name)
        if index is None:
            same = by_name.get(name, [])
            if len(same) > 1:
                named = ", ".join(display_path(files[i].relative_to(root).as_posix()) for i in same[:2])
                raise DataError(f"{shown}:{number}: '{name[:80]}' names {len(same)} images ({named}"
                                f"{' ...' if len(same) > 2 else ''}); give the path relative to "
                                f"{display_path(root)} instead")
            if not same:
                continue
            index = same[0]
        if labels[index] is not None and labels[index] != label:
            raise DataError(f"{shown}:{lines[index]} and {shown}:{number} give "
                            f"{display_path(files[index].relative_to(root).as_posix())} two classes "
                            f"({labels[index]} and {label})")
        if labels[index] is None:
            labels[index], lines[index] = label, number
    missing = [f for f, label in zip(files, labels, strict=True) if label is None]
    if missing:
        raise DataError(f"labels file {shown} has no label for {len(missing)} of {len(files)} images "
                        f"(first: {display_path(missing[0].relative_to(root).as_posix())})")
    return labels  # type: ignore[return-value] - no None left


def _labels_for(files: list[Path], root: Path, labels_file: Path, num_classes: int) -> list[int]:
    """Labels from a CSV or ``name label`` text file (matched by name), the devkit's ground truth or a text file of
    one label per line (both in sorted file-name order)."""
    if not labels_file.is_file():
        raise DataError(f"labels file not found: {display_path(labels_file)}")
    shown = display_path(labels_file)
    if labels_file.suffix.lower() == ".csv":
        return _match_by_name(_csv_entries(labels_file, shown), files, root, shown, num_classes)
    if labels_file.name.startswith("ILSVRC2012_validation_ground_truth"):
        labels = _devkit_labels(labels_file)
    else:
        entries, named = _text_entries(labels_file, shown)
        if named:
            return _match_by_name(entries, files, root, shown, num_classes)
        labels = [_parse_label(text, f"{shown}:{n}", num_classes) for n, _, text in entries]
    if len(labels) != len(files):
        raise DataError(f"labels file {shown} has {len(labels)} labels but {display_path(root)} holds {len(files)} "
                        "images "
                        "(one label per image, in sorted file-name order)")
    return labels


def discover(img_path: str | Path, labels_file: str | Path | None = None, num_classes: int = 1000,
             need_labels: bool = False, outputs: Sequence[str | Path] = (), limit: int | None = None) -> list[Sample]:
    """The samples under ``img_path`` with labels from class folders or ``labels_file``.

    need_labels: the caller evaluates ground-truth classes, so images without a label are an error.
    outputs: output folders, left out of the listing (:func:`common.images.find_image_names`).
    limit: the first ``limit`` samples only (in key order); the tree is still listed and sorted (the first
    files and a labels file's matching need all of it), but only these samples are built.
    Works on path strings (50k files: 0.3 s CPU), Paths are made for the samples returned.
    """
    root = Path(img_path)
    names = find_image_names(root, outputs)
    root = root if root.is_dir() else root.parent
    relative = [_relative(name, root) for name in names]
    folders = [rel.rsplit("/", 2)[-2] if "/" in rel else root.name for rel in relative]
    in_class_folders = [i for i, folder in enumerate(folders) if WNID.match(folder)]
    chosen = range(len(names))
    if labels_file is None and in_class_folders and len(in_class_folders) < len(names):
        wnid_files = set(in_class_folders)
        stray = [display_path(relative[i]) for i in chosen if i not in wnid_files]
        warnings.warn(f"{len(stray)} image file(s) under {display_path(root)} are outside the ImageNet class folders "
                      f"(n01440764/...) and are left out: {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}",
                      stacklevel=2)
        chosen = in_class_folders
    if labels_file is not None:
        files = [Path(names[i]) for i in chosen]
        labels: Sequence[int | None] = _labels_for(files, root, Path(labels_file), num_classes)
        samples = [Sample(f, display_path(relative[i]), label)
                   for f, i, label in zip(files, chosen, labels, strict=True)]
        return samples[:limit] if limit else samples
    chosen = chosen[:limit] if limit else chosen
    if in_class_folders:
        if num_classes != 1000:
            raise DataError("class folders name ImageNet-1k wnids but the model has "
                            f"{num_classes} classes; pass --target pred or --labels")
        return [Sample(Path(names[i]), display_path(relative[i]), wnid_index(folders[i])) for i in chosen]
    if need_labels:
        raise DataError(f"--target gt needs ground truth: ImageNet class folders (n01440764/...) under "
                        f"{display_path(img_path)} or --labels FILE; use --target pred for a plain folder")
    return [Sample(Path(names[i]), display_path(relative[i])) for i in chosen]


def _relative(name: str, root: Path) -> str:
    """``name`` relative to ``root``, '/'-separated (what Path.relative_to(...).as_posix() gives)."""
    top = str(root)
    if top != "." and name.startswith(top + os.sep):
        rel = name[len(top) + 1:]
    else:
        rel = os.path.relpath(name, top)
    return rel.replace(os.sep, "/") if os.sep != "/" else rel
