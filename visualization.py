#!/usr/bin/env python
"""Saliency maps of a method (and its UCAG version) for an image or a folder of images.

    python visualization.py gradcam --ucag -a 2.6 -c 124 -n 6
    python visualization.py gradcam --ucag --name resnet50 --img-path /data/imagenet/val --device cuda

For every image, writes under --out (mirroring sub-folders): <stem>_<method>.png (input, map overlay and,
with --ucag, the UCAG overlay), <stem>_<method>.npy and <stem>_<method>_ucag.npy (float32, original
H x W, values in [0, 1]); plus predictions.csv and skipped.txt for the whole run.

Without --blend the UCAG .npy is the paper's map (constant blend, as every evaluation script computes it)
and the picture shows the seamless gaussian blend of the same crops (measured not to lower the
insertion/deletion AUCs; README, "Seamless UCAG pictures"); the panel's title names the blend shown.
With --blend both use the blend given.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from app.evaluation_run import check_limit, output_folders
from app.flags import Parser, UsageError, add_common_flags
from app.lifecycle import run_cli
from app.setup import Setup, build_setup, parse_target
from common.files import save_npy, write_text
from common.images import display_path, find_images, load_rgb
from common.render import overlay, save_panels, signed_overlay
from evaluation.data import ImageRecord, image_batches, start_batches
from evaluation.rows import Row, batch_targets, explain_rows
from evaluation.store import check_output_folder
from methods.targets import target_probabilities
from models import preprocess
from ucag.blending import SIGMA_FRACTION

# The blend of the UCAG picture when --blend is not given (the .npy keeps the paper's constant fold).
PICTURE_BLEND = "gaussian"

PROG = "visualization.py"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    add_common_flags(parser)
    for action in parser._actions:
        if action.dest == "blend":
            action.help = (f"UCAG fold of the .npy and the picture: 'constant' (the paper's sum / Gamma) or 'gaussian' "
                           f"(Gaussian window over each crop, sigma = {SIGMA_FRACTION:g} of its side: no crop grid). "
                           f"Default: the .npy constant (the paper's map, as the evaluation scripts), the picture "
                           f"{PICTURE_BLEND} (constant with --official); the picture's title names it")
    parser.add_argument("--img-path", default="examples",
                        help="image file or folder, read recursively (default examples/)")
    parser.add_argument("--target", default="pred", help="'pred' (predicted class, default) or a class index")
    parser.add_argument("--out", default="results", help="output folder (default results/)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (in path order)")
    return parser


def output_stems(files: Sequence[Path], root: Path, out: Path, method: str) -> dict[Path, Path]:
    """out/<sub-folders of each image below root>/<stem>_<method>; when two images of the run share a stem
    in one folder (cat.jpg, cat.png), their extension is kept in the name (cat_jpg_<method>, cat_png_<method>)
    so no output overwrites another."""
    def relative(path: Path) -> Path:
        try:
            return path.parent.relative_to(root)
        except ValueError:
            return Path()

    seen = Counter((relative(path), path.stem) for path in files)
    stems = {}
    for path in files:
        folder = relative(path)
        name = path.stem if seen[(folder, path.stem)] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}"
        stems[path] = out / folder / f"{name}_{method}"
    return stems


def picture_blend(args, setup: Setup) -> str | None:
    """The UCAG fold the picture shows: --blend when given, else PICTURE_BLEND where the UCAG protocol allows it
    (the official code's allows its constant fold only); None without --ucag."""
    if setup.ucag is None:
        return None
    return args.blend or (PICTURE_BLEND if PICTURE_BLEND in setup.ucag.protocol.blends else "constant")


def explain_batch(setup: Setup, records: list[ImageRecord], target: int | None, blend: str | None = None):
    """Raw maps of every row (the method; with --ucag the method with UCAG) for a batch of decoded images as
    (row, maps for the .npy, maps for the picture), with the explained classes and their probabilities.
    ``target``: a class index, None for the prediction (x's logits of one no-grad forward, reused by the UCAG
    row).
    ``blend``: the UCAG picture's fold; when it is not the .npy's, the crops are explained once and folded
    both ways."""
    x = preprocess([record.input for record in records], setup.spec, setup.device)
    given = None if target is None else torch.full((len(records),), target, device=setup.device)
    targets, logits = batch_targets(setup.spec.model, x, given)
    explained = list(explain_rows(setup.rows(), x, targets, logits, also=blend))
    maps = [(row, explanation.maps, shown.maps) for row, explanation, shown in explained]
    # the probabilities of the base row's logits (x's, the contract's), as the release computed them
    return maps, targets, target_probabilities(explained[0][1].logits, targets, setup.spec.multilabel)


def base_title(setup: Setup) -> str:
    """The base row's panel title: the method, with --input-scale S its factor ('gradcam x2.0')."""
    return setup.method if setup.input_scale == 1 else f"{setup.method} x{round(setup.input_scale, 3)}"


def ucag_title(setup: Setup, args, blend: str) -> str:
    crop_input = setup.ucag.crop_input if setup.ucag is not None else None
    scale = f"a={args.alpha:g}" if crop_input is None else f"crops at {crop_input[1]}x{crop_input[0]}"
    return f"{setup.method} + UCAG ({scale}, c={args.crop_size:g}, n={args.num_patches}, blend: {blend})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup = build_setup(args)
    target = parse_target(args.target, setup.spec)
    check_limit(args.limit)
    files = find_images(args.img_path, output_folders(args.out, args.img_path))[:args.limit]
    if len(files) == 1:
        load_rgb(files[0])  # a single unreadable file is an error, not a skip
    root = Path(args.img_path) if Path(args.img_path).is_dir() else Path(args.img_path).parent
    out = check_output_folder(args.out)
    stems = output_stems(files, root, out, setup.file_label)
    if any(stem.name != f"{path.stem}_{setup.file_label}" for path, stem in stems.items()):
        tqdm.write("note: some images share a file stem in one folder; their outputs keep the extension "
                   "(<stem>_<ext>_<method>)")
    label = setup.method if setup.ucag is None else f"{setup.method}+UCAG"
    print(f"{label} on {setup.spec.name} ({setup.spec.weights} weights, layer {setup.spec.target_layer}) "
          f"over {len(files)} image(s), device {setup.device}")
    if setup.ucag is not None and setup.spec.token_layout and setup.ucag.crop_input is None:
        print("UCAG's crops go to the transformer at alpha * crop: its position embeddings and attention windows "
              "follow the input size (timm's dynamic image size)")
    smallest_crop = int(args.crop_size * min(setup.spec.input_size) / 224)
    blend = picture_blend(args, setup)
    rows, skipped = [], []
    bar = tqdm(total=len(files), unit="img", desc=label)
    for batch in start_batches(image_batches(files, args.batch_size, args.workers if len(files) > 1 else 0,
                                             pin_memory=setup.device.type == "cuda")):
        for record in batch:
            if record.error:
                skipped.append(record)
                tqdm.write(f"skipped {display_path(record.path)}: {record.error}")
        records = [record for record in batch if record.image is not None]
        if records:
            with setup.precision.autocast():
                maps, targets, probs = explain_batch(setup, records, target, blend)
            for i, record in enumerate(records):
                rows.append(save_outputs(setup, args, record, stems[record.path],
                                         [(row, raw[i:i + 1], None if shown is raw else shown[i:i + 1])
                                          for row, raw, shown in maps],
                                         int(targets[i]), float(probs[i]), smallest_crop, blend))
        bar.update(len(batch))
    bar.close()
    write_run_files(out, rows, skipped)
    note = f"; skipped {len(skipped)} (see skipped.txt)" if skipped else ""
    print(f"wrote maps of {len(rows)} image(s) to {out}/{note}")
    if not rows:
        raise_no_images(skipped)
    return 0


def save_outputs(setup: Setup, args, record: ImageRecord, stem: Path,
                 maps: list[tuple[Row, torch.Tensor, torch.Tensor | None]], target: int, prob: float,
                 smallest_crop: int, blend: str | None = None) -> dict:
    """Write the .npy maps and the .png panel of one image; returns its predictions.csv row. Each row: raw maps
    for the .npy and, when the picture shows other maps (UCAG's picture blend), those (else None)."""
    height, width = record.image.shape[:2]
    if min(height, width) < smallest_crop:
        tqdm.write(f"note: {display_path(record.path)} ({width}x{height}) is smaller than a crop; upsampled to "
                   f"{setup.spec.input_size[1]}x{setup.spec.input_size[0]} before unfolding")
    stem.parent.mkdir(parents=True, exist_ok=True)
    class_name = setup.spec.categories[target] if target < setup.spec.num_classes else str(target)
    panels = [(record.image, "input")]
    for row, raw, shown in maps:
        final = row.final(raw, (height, width))[0, 0].cpu().numpy().astype(np.float32)
        save_npy(Path(f"{stem}_ucag.npy" if row.ucag else f"{stem}.npy"), final)
        if shown is not None:
            final = row.final(shown, (height, width))[0, 0].cpu().numpy().astype(np.float32)
        title = ucag_title(setup, args, blend or row.explainer.blend) if row.ucag else base_title(setup)
        panels.append(((signed_overlay if row.explainer.signed else overlay)(record.image, final), title))
    header = f"{display_path(record.path.name)}: {class_name} (class {target}), p={prob:.3f}"
    save_panels(Path(f"{stem}.png"), panels, header=header)
    return {"file": display_path(record.path), "target": target, "class": class_name,
            "probability": f"{prob:.6f}", "figure": display_path(f"{stem}.png")}


def write_run_files(out: Path, rows: list[dict], skipped: list[ImageRecord]) -> None:
    """predictions.csv and skipped.txt of the run (names that are not UTF-8 written with \\xNN escapes)."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["file", "target", "class", "probability", "figure"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "predictions.csv", table.getvalue())
    write_text(out / "skipped.txt", "".join(f"{display_path(record.path)}\t{record.error}\n" for record in skipped))


def raise_no_images(skipped: list[ImageRecord]) -> None:
    raise UsageError(f"none of the {len(skipped)} image files could be read (see skipped.txt)")


if __name__ == "__main__":
    run_cli(main, prog=PROG)
