#!/usr/bin/env python
"""Insertion/deletion of Grad-CAM and of UCAG with the constant and the gaussian blend on the photos at hand.

    python benchmarks/blend_insdel.py                  # gathers the photos, runs insdel.py twice, prints a table
    python benchmarks/blend_insdel.py --photos-only    # only gather the photos (into --work/photos)

The photos are the bundled examples/ plus the real photographs shipped inside installed packages, read
offline: scikit-image's data folder (those examples/ does not already hold; synthetic pictures such as the
chessboard, colour wheel, logo, phantom and horse silhouette are left out), matplotlib's sample photo and
scikit-learn's two sample photos. OpenCV's wheel ships no sample images (``cv2.samples.findFile`` finds
nothing and ``cv2/data`` holds no pictures), so it adds none. There are no labels: every image is explained
and scored for the model's prediction (``--target pred``). Each run is ``insdel.py gradcam --ucag`` on the
embedded model, CPU, one process; the two runs differ only in ``--blend`` and share the Grad-CAM row.
Rerunning resumes the two runs (insdel.py's own resume), so the table can be printed again at no cost.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# scikit-image data files that are photographs (examples/ already holds camera, chelsea, coffee and
# motorcycle_left as camera.png, chelsea.jpg, coffee.jpg, motorcycle.jpg)
SKIMAGE_PHOTOS = ["astronaut.png", "brick.png", "cell.png", "clock_motion.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
                  "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png"]
PACKAGE_PHOTOS = {"matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
                  "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"]}
PACKAGE_PHOTOS["skimage"] = [f"data/{name}" for name in SKIMAGE_PHOTOS]


def package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def gather_photos(folder: Path) -> list[Path]:
    """Copy every photo into ``folder`` (flat, names prefixed by their source); returns the copies."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    sources = [("examples", path) for path in sorted((REPO / "examples").iterdir())]
    for package, names in PACKAGE_PHOTOS.items():
        root = package_folder(package)
        for name in names:
            if root is not None and (root / name).is_file():
                sources.append((package, root / name))
            else:
                print(f"note: {package}/{name} not found, left out")
    for prefix, path in sources:
        copy = folder / f"{prefix}_{path.name}"
        shutil.copyfile(path, copy)
        copies.append(copy)
    return copies


def run_insdel(photos: Path, out: Path, blend: str, extra: list[str]) -> dict:
    command = [sys.executable, str(REPO / "insdel.py"), "gradcam", "--ucag", "--blend", blend,
               "--img-path", str(photos), "--target", "pred", "--device", "cpu", "--workers", "0",
               "--out", str(out), *extra]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads((out / "summary.json").read_text())


def per_image(out: Path, column: str) -> dict[str, float]:
    with open(out / "per_image.csv", newline="") as handle:
        return {row["file"]: float(row[column]) for row in csv.DictReader(handle)}


def paired(work: Path, field: str) -> str:
    """gaussian - constant per image: mean, its standard error, and on how many images gaussian is better."""
    constant, gaussian = (per_image(work / blend, f"gradcam*_{field}") for blend in ("constant", "gaussian"))
    diffs = [gaussian[name] - constant[name] for name in constant]
    mean = statistics.fmean(diffs)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs))
    better = sum(d < 0 if field == "deletion" else d > 0 for d in diffs)
    worst = max(diffs, key=abs)
    name = Path(next(n for n in constant if gaussian[n] - constant[n] == worst)).name
    return (f"{field}: gaussian - constant = {mean:+.2f} +- {error:.2f} (mean +- s.e. over images), gaussian better "
            f"on {better}/{len(diffs)}; largest change {worst:+.1f} ({name}), mean without it "
            f"{statistics.fmean(d for d in diffs if d != worst):+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="results/blend_insdel", help="photos and the two runs' folders")
    parser.add_argument("--photos-only", action="store_true")
    parser.add_argument("extra", nargs="*", help="more insdel.py flags after --, e.g. -- --limit 4")
    args = parser.parse_args()
    work = Path(args.work)
    photos = gather_photos(work / "photos")
    print(f"{len(photos)} photos in {work / 'photos'}")
    if args.photos_only:
        return
    summaries = {blend: run_insdel(work / "photos", work / blend, blend, args.extra)
                 for blend in ("constant", "gaussian")}
    rows = {}
    for blend, summary in summaries.items():
        for row in summary["rows"]:
            rows[f"{row['name']} ({blend})" if row["ucag"] else row["name"]] = row
    base = [name for name in rows if "(" not in name]
    print(f"\n{summaries['constant']['n_images']} images; AUC x100, deletion lower is better, insertion higher\n")
    print("| map | deletion | insertion |\n|---|---|---|")
    for name in base[:1] + [name for name in rows if "(" in name]:
        print(f"| {name} | {rows[name]['deletion']:.2f} | {rows[name]['insertion']:.2f} |")
    print()
    for field in ("deletion", "insertion"):
        print(paired(work, field))


if __name__ == "__main__":
    main()
