"""A study's report (reproduce.py): study.json (every point's summary), study.md (one table, a line per point
and summary row) and, with [plot], plot_<field>.png (each main field against the swept x, one line per series
value and row: base dashed, UCAG solid). Written whole or not at all, as every report (evaluation.reports)."""
from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from evaluation.reports import _replace_with, write_text


def main_fields(points: Sequence[dict], fields: Sequence[str] | None) -> list[str]:
    """The summary-row fields of the table and the plots: ``fields`` (those the rows have), or every number
    of the rows in their order."""
    rows = [row for point in points for row in (point.get("summary") or {}).get("rows", [])]
    if fields is not None:
        return [f for f in fields if any(f in row for row in rows)]
    found: list[str] = []
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in found:
                found.append(key)
    return found


def _cell(value, digits: int) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _swept(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(_swept(v) for v in value)
    return str(value)


def study_table(study: dict, fields: Sequence[str] | None, digits: int) -> str:
    """study.md: the swept values as first columns, then the summary row, its image count and main fields."""
    points = study["points"]
    keys = list(points[0]["sweep"]) if points else []
    shown = main_fields(points, fields)
    lines = [f"# {study['name']}", "",
             f"Study of `{study['script']}.py`, {len(points)} point(s), one line per point and summary row; "
             "`*` rows = with UCAG.", "",
             "| " + " | ".join([*keys, "row", "images", *shown]) + " |",
             "|" + "---|" * (len(keys) + 2 + len(shown))]
    for point in points:
        summary = point.get("summary")
        swept = [_swept(point["sweep"][key]) for key in keys]
        if not summary:
            lines.append("| " + " | ".join([*swept, "(not run)", "-", *["-"] * len(shown)]) + " |")
            continue
        for row in summary["rows"]:
            cells = [_cell(row.get(field), digits) for field in shown]
            lines.append("| " + " | ".join([*swept, row["name"], str(summary.get("n_images", "-")), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _role(row: dict) -> str:
    return "UCAG" if row.get("ucag") else ("center" if row["name"] == "center" else "base")


STYLES = {"base": "--", "UCAG": "-", "center": ":"}


def plot_study(out: Path, study: dict, plot: dict, fields: Sequence[str] | None) -> list[Path]:
    """plot_<field>.png for each main field: the field against plot['x']; a line per value of the other swept
    flags (plot['series'] first) and row role (base dashed, UCAG solid, center dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in study["points"] if p.get("summary")]
    x_key = plot["x"]
    keys = list(study["points"][0]["sweep"]) if study["points"] else []
    series_key = plot.get("series")
    others = ([series_key] if series_key else []) + [k for k in keys if k not in (x_key, series_key)]
    xs = []
    for point in study["points"]:
        value = point["sweep"][x_key]
        if value not in xs:
            xs.append(value)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    position = {_swept(v): (float(v) if numeric else i) for i, v in enumerate(xs)}
    written = []
    for field in main_fields(points, fields):
        lines: dict[tuple, dict] = {}
        for point in points:
            series = tuple(_swept(point["sweep"][k]) for k in others)
            for row in point["summary"]["rows"]:
                value = row.get(field)
                if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
                    continue
                line = lines.setdefault((series, _role(row)), {"names": [], "points": []})
                line["names"].append(row["name"])
                line["points"].append((position[_swept(point["sweep"][x_key])], value))
        if not lines:
            continue
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        colours = {}
        for (series, role), line in lines.items():
            colour = colours.setdefault(series, f"C{len(colours) % 10}")
            line_points = sorted(line["points"])
            names = sorted(set(line["names"]))
            label = ", ".join([*(f"{k}={v}" for k, v in zip(others, series, strict=True)),
                               names[0] if len(names) == 1 else role])
            axis.plot([p[0] for p in line_points], [p[1] for p in line_points], STYLES[role], marker="o",
                      color=colour, label=label)
        if not numeric:
            axis.set_xticks(range(len(xs)), [_swept(v) for v in xs])
        axis.set_xlabel(x_key)
        axis.set_ylabel(field)
        axis.set_title(f"{study['name']}: {field}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        path = out / f"plot_{field}.png"
        _replace_with(path, buffer.getvalue())
        written.append(path)
    return written


def write_study_report(out: Path, study: dict, fields: Sequence[str] | None, digits: int,
                       plot: dict | None) -> list[Path]:
    """study.json, study.md and (with ``plot``) the figures; returns the files written."""
    write_text(out / "study.json", json.dumps(study, indent=2, allow_nan=True) + "\n")
    write_text(out / "study.md", study_table(study, fields, digits))
    written = [out / "study.json", out / "study.md"]
    if plot:
        written += plot_study(out, study, plot, fields)
    return written
