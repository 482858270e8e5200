"""A study's report.html (reproduce.py): its table (a line per point and summary row), its figures, a gallery
of maps (images x methods, each picture the input, the base map and the UCAG map side by side, as the paper's
qualitative figures) and a sortable table of every point's per-image scores, on one self-contained page
(:mod:`evaluation.html_report`)."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from evaluation.html_report import Block, Figure, Gallery, Table, write_html_report

PER_IMAGE_LIMIT = 5000  # per-image lines on the page at most (the CSV files keep them all)


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4f}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return str(value)


def summary_table(study: dict) -> Table:
    """One line per point and summary row: the swept values, the row, its images, every scalar field."""
    points = study["points"]
    keys = list(points[0]["sweep"]) if points else []
    fields: list[str] = []
    for point in points:
        for row in (point.get("summary") or {}).get("rows", []):
            fields += [name for name, value in row.items() if name not in fields and name not in ("name", "ucag")
                       and isinstance(value, (int, float)) and not isinstance(value, bool)]
    lines = []
    for point in points:
        summary = point.get("summary")
        swept = [_cell(point["sweep"][key]) for key in keys]
        if not summary:
            lines.append([*swept, "(not run)", "-", *["-"] * len(fields)])
            continue
        for row in summary["rows"]:
            lines.append([*swept, row["name"], _cell(summary.get("n_images")), *(_cell(row.get(f)) for f in fields)])
    return Table(f"{study['name']}: {study['script']}.py, {len(points)} point(s); * = with UCAG",
                 [*keys, "row", "images", *fields], lines, sortable=True)


def per_image_table(out: Path, study: dict, limit: int = PER_IMAGE_LIMIT) -> tuple[Table | None, int]:
    """(every point's per_image.csv as one sortable table with the point first, the number of lines left
    out beyond ``limit``)."""
    headers: list[str] = []
    lines: list[list[str]] = []
    total = 0
    for point in study["points"]:
        path = out / point["point"] / "per_image.csv"
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                continue
            if not headers:
                headers = ["point", *header]
            for line in reader:
                total += 1
                if len(lines) < limit and len(line) == len(headers) - 1:
                    lines.append([point["point"], *line])
    if not headers:
        return None, 0
    return Table("Per image (click a column to sort)", headers, lines, sortable=True), total - len(lines)


def gallery(pictures: Sequence[tuple[str, str, Path]]) -> Gallery | None:
    """(image, method, picture) triples as a grid: a line per image, a column per method."""
    if not pictures:
        return None
    methods = list(dict.fromkeys(method for _, method, _ in pictures))
    images = list(dict.fromkeys(image for image, _, _ in pictures))
    found = {(image, method): path for image, method, path in pictures}
    return Gallery("Maps: each picture is the input, the method's map and the UCAG map", methods,
                   [(image, [found.get((image, method)) for method in methods]) for image in images])


def write_study_page(out: Path, study: dict, figures: Sequence[Path],
                     pictures: Sequence[tuple[str, str, Path]] = ()) -> Path:
    """DIR/report.html from the study (study.json's content), its figure files and gallery pictures."""
    blocks: list[Block] = [f"{len(study['points'])} point(s) of {study['script']}.py, each an ordinary run folder "
                           f"under {out.name}/ (run.json, summary.json, per_image.csv, the script's pictures).",
                           summary_table(study)]
    blocks += [Figure(path.stem.replace("plot_", "").replace("_", " "), path) for path in figures]
    grid = gallery(pictures)
    if grid is not None:
        blocks.append(grid)
    table, left_out = per_image_table(out, study)
    if table is not None:
        blocks.append(table)
        if left_out:
            blocks.append(f"{left_out} more per-image lines are in the points' per_image.csv files.")
    path = out / "report.html"
    write_html_report(path, study["name"], blocks)
    return path
