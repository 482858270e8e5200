#!/usr/bin/env python
"""A whole study from one file: a script, its flags and a sweep (app.study), every point an ordinary run.

    python reproduce.py studies/demo.toml --dry-run
    python reproduce.py studies/demo.toml --out results/studies/demo
    torchrun --nproc_per_node=4 reproduce.py studies/scale.toml

Every point runs the script in this process with --out DIR/<point> (its own outputs, run.json identity and
resume): a rerun of a stopped study continues where it stopped. Points that differ only in UCAG's settings
take the base row from the first of them (--base-from, checked through the run identity). Writes
DIR/study.json (every point's summary), DIR/study.md (one table), with [plot] DIR/plot_<field>.png, and
DIR/report.html (tables, figures, a gallery of maps, the per-image scores). DIR defaults to
results/studies/<file stem>.
"""
from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from app.evaluation_run import check_limit
from app.flags import Parser, UsageError
from app.lifecycle import run_cli
from app.setup import check_flags
from app.study import Point, Script, Study, count_images, point_state, read_study
from common.errors import ToolkitError
from common.images import display_path
from evaluation import distributed
from evaluation.store import check_output_folder
from evaluation.study_page import write_study_page
from evaluation.study_report import write_study_report

PROG = "reproduce.py"

# The scripts a study can name (each with build_parser, main(argv, on_batch) and PROG), the summary-row fields its
# study.md and plots show and their digits; a new script is one line here.
SCRIPTS = {
    "insdel": Script("insdel", ("deletion", "insertion"), 2),
    "density": Script("density", ("positive", "negative"), 3),
    "confidence": Script("confidence", ("drop", "increase", "change"), 4),
    "road": Script("road", ("morf", "lerf", "combined"), 4),
    "sanity": Script("sanity", ("spearman", "spearman_abs", "ssim", "hog"), 3),  # at the verdict's step
    "pointing_game": Script("pointing_game", ("pointing_all", "pointing_difficult", "energy_all",
                                              "energy_difficult"), 1),
    "segmentation": Script("segmentation", ("pixel_accuracy", "map"), 2),
}
STUDIES = Path("results") / "studies"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("study", help="the study file (TOML): name, script, [args], [sweep], optional [plot]")
    parser.add_argument("--out", default=None, help="the study's folder (default results/studies/<file stem>); "
                                                    "each point's run goes to DIR/<point>/")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points (folder, command), their images and whether each is done; run nothing")
    return parser


# Flags (argparse dests) that concern only the UCAG row or no number at all: points equal in every other flag
# share the base row (--base-from the first of them; the script checks it through the run identity)
UCAG_ROW_FLAGS = {"ucag", "alpha", "crop_size", "num_patches", "no_confidence", "blend", "patch_batch", "out",
                  "fresh", "base_from", "batch_size", "workers", "score_batch"}
GALLERY_IMAGES = 4  # images of the report's gallery
# the common flags the gallery's visualization.py runs take from a point (argparse dest -> flag)
GALLERY_FLAGS = {"name": "--name", "weights": "--weights", "target_layer": "--target-layer", "alpha": "-a",
                 "crop_size": "-c", "num_patches": "-n", "blend": "--blend", "input_scale": "--input-scale",
                 "smooth": "--smooth", "smooth_seed": "--smooth-seed", "device": "--device",
                 "precision": "--precision", "img_path": "--img-path"}
GALLERY_SWITCHES = {"no_confidence": "--no-confidence", "official": "--official", "score": "--score"}


def base_sources(study: Study) -> dict[str, str]:
    """{point: the earlier point whose base row it takes}: points of a script with --base-from that differ
    only in UCAG's settings (not under --official, where alpha also upscales the base row)."""
    first: dict[tuple, str] = {}
    sources = {}
    for point in study.points:
        flags = vars(point.args)
        if "base_from" not in flags or flags.get("official"):
            continue
        key = tuple(sorted((name, repr(value)) for name, value in flags.items() if name not in UCAG_ROW_FLAGS))
        if key in first:
            sources[point.name] = first[key]
        else:
            first[key] = point.name
    return sources


def point_argv(point: Point, out: Path, source: str | None = None) -> list[str]:
    base = [] if source is None else ["--base-from", str(out / source)]
    return [*point.argv, "--out", str(out / point.name), *base]


def gallery_argv(point: Point, folder: Path) -> list[str]:
    """visualization.py's flags for the gallery of ``point``'s method: its model, UCAG and input flags."""
    flags = vars(point.args)
    argv = [flags["method"], "--ucag", "--limit", str(GALLERY_IMAGES), "--out", str(folder)]
    for name, flag in GALLERY_FLAGS.items():
        if flags.get(name) is not None:
            argv += [flag, str(flags[name])]
    return argv + [flag for name, flag in GALLERY_SWITCHES.items() if flags.get(name)]


def make_gallery(study: Study, out: Path) -> list[tuple[str, str, Path]]:
    """(image, method, picture) for the report: visualization.py on the first images, once per method (the
    first point of each), into DIR/gallery/<method>/; a method whose pictures are there already is not redone.
    Scripts without an image folder (the localization datasets) have no gallery."""
    import visualization
    pictures = []
    done = set()
    for point in study.points:
        flags = vars(point.args)
        if flags.get("img_path") is None or flags["method"] in done:
            continue
        done.add(flags["method"])
        folder = out / "gallery" / flags["method"].replace(":", "-")
        if len(list(folder.glob("*.png"))) < GALLERY_IMAGES:
            try:
                visualization.main(gallery_argv(point, folder))
            except ToolkitError as exc:  # the points' results stand; the report goes without these pictures
                tqdm.write(f"note: no gallery for {flags['method']}: {exc}")
                continue
        label = flags["method"].replace(":", "-")
        for path in sorted(folder.rglob(f"*_{label}.png")):
            pictures.append((path.name[:-len(f"_{label}.png")], flags["method"], path))
    return pictures


def dry_run(study: Study, out: Path) -> int:
    """The points, each one's images and state, and the command it runs; nothing is written."""
    print(f"study {study.name!r}: {study.script}.py, {len(study.points)} point(s), folder {display_path(str(out))}/")
    total = 0
    sources = base_sources(study)
    for point in study.points:
        folder = out / point.name
        try:
            images = count_images(point.args, folder)
            count = f"{images} image(s)"
            total += images
        except ToolkitError as exc:
            images, count = None, f"data missing: {exc}"
        state = point_state(folder, images)
        print(f"  {point.name}: {count}, {state}")
        print(f"    {study.script}.py {shlex.join(point_argv(point, out, sources.get(point.name)))}")
    print(f"{total} image(s) over all points")
    return 0


def read_summary(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def study_record(study: Study, out: Path) -> dict:
    sources = base_sources(study)
    return {"name": study.name, "script": study.script,
            "points": [{"point": p.name, "sweep": p.sweep, "argv": point_argv(p, out, sources.get(p.name)),
                        "summary": read_summary(out / p.name)} for p in study.points]}


def check_points(study: Study) -> None:
    """Every point's common flags checked as its script will (app.setup.check_flags), before the first point
    runs: a bad value of the tenth point is not found after nine runs."""
    for point in study.points:
        try:
            if hasattr(point.args, "alpha"):  # the common flags (app.flags.add_common_flags)
                check_flags(point.args)
            check_limit(getattr(point.args, "limit", None))
        except UsageError as exc:
            raise UsageError(f"{display_path(str(study.path))}: point {point.name}: {exc}") from None


def run_study(study: Study, out: Path, on_batch: Callable[[str, int], None] | None = None) -> int:
    """Every point in turn, the script called in-process; under torchrun the process group is joined once
    here and every point is sharded by its script; rank 0 writes the study's outputs."""
    module = study.entry.load()
    info, _ = distributed.init(None)
    try:
        if info.is_main:
            check_output_folder(out)
        bar = tqdm(total=len(study.points), unit="point", desc=f"study {study.name}", position=0,
                   disable=not info.is_main)
        sources = base_sources(study)
        try:
            for point in study.points:
                bar.set_postfix_str(point.name, refresh=True)
                hook = None if on_batch is None else (lambda number, name=point.name: on_batch(name, number))
                try:
                    module.main(point_argv(point, out, sources.get(point.name)), on_batch=hook)
                except ToolkitError as exc:
                    if not _rewordable(exc):
                        raise
                    raise type(exc)(f"point {point.name}: {exc}") from None
                bar.update(1)
        finally:
            bar.close()
        if info.is_main:
            record = study_record(study, out)
            written = write_study_report(out, record, study.entry.fields, study.entry.digits, study.plot)
            figures = [path for path in written if path.name.startswith("plot_")]
            written.append(write_study_page(out, record, figures, make_gallery(study, out)))
            print(f"study {study.name!r}: {len(study.points)} point(s); wrote "
                  + ", ".join(display_path(str(path)) for path in written))
    finally:
        distributed.finish(info)
    return 0


def _rewordable(exc: ToolkitError) -> bool:
    """Whether the error's class takes its message as its one argument (so the point's name can be added)."""
    try:
        type(exc)("probe")
    except Exception:  # noqa: BLE001 - a class with another constructor keeps its own message
        return False
    return True


def main(argv: Sequence[str] | None = None, on_batch: Callable[[str, int], None] | None = None) -> int:
    """``on_batch(point, batch number)``: called after every batch of every point (tests)."""
    args = build_parser().parse_args(argv)
    study = read_study(args.study, SCRIPTS)
    check_points(study)
    out = Path(args.out) if args.out else STUDIES / Path(args.study).stem
    if args.dry_run:
        if int(os.environ.get("RANK", "0")) == 0:
            dry_run(study, out)
        return 0
    return run_study(study, out, on_batch)


if __name__ == "__main__":
    run_cli(main, prog=PROG)

