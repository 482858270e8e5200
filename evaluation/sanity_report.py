"""sanity.py's report: per_image.csv, summary.json, table.md, sanity_curves.png, sanity_maps.png, skipped.txt.

per_image.csv is long: one line per image, row and step (file, target, row, step, layer, the four similarities;
random_class with --mode logit). table.md gives each row's similarities after the last step and a verdict: a row
whose mean Spearman stays at or above :data:`FAIL_THRESHOLD` fails the check (cascading: after the whole model
is randomised; independent: even at the step that changes the map most; logit: for the random other class).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection
from pathlib import Path

import numpy as np

from evaluation.reports import open_report, write_skipped, write_text
from evaluation.similarity import FIELDS

FAIL_THRESHOLD = 0.9  # mean Spearman at or above it: the map does not depend on what was randomised
MAX_MAP_COLUMNS = 12  # sanity_maps.png: the image, the original map and at most this many steps in all
LABELS = {"spearman": "Spearman", "spearman_abs": "Spearman of |map|", "ssim": "SSIM", "hog": "HOG (Pearson)"}
REASONS = {"cascading": "the map does not depend on the weights",
           "independent": "no single layer's weights change the map",
           "logit": "the map does not depend on the class"}


def _clean(value):
    """NaN -> None (JSON null), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_per_image(path: Path, records: Collection[dict], summary: dict) -> None:
    layers = summary["layers"]
    names = [row["name"] for row in summary["rows"]]
    logit = summary["mode"] == "logit"
    with open_report(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "target", *(["random_class"] if logit else []), "row", "step", "layer", *FIELDS])
        for record in records:
            extra = [record["random_class"]] if logit else []
            for name in names:
                scores = record["rows"][name]
                for step, layer in enumerate(layers):
                    writer.writerow([record["file"], record["target"], *extra, name, step, layer,
                                     *(f"{scores[f][step]:.6f}" for f in FIELDS)])


def verdict_step(row: dict, mode: str) -> dict:
    """The step the verdict reads: the last (cascading, logit) or the one of lowest mean Spearman
    (independent)."""
    if mode != "independent":
        return row["steps"][-1]
    finite = [step for step in row["steps"] if not math.isnan(step["spearman"])]
    return min(finite, key=lambda step: step["spearman"]) if finite else row["steps"][-1]


def verdict(row: dict, mode: str) -> str:
    value = verdict_step(row, mode)["spearman"]
    if math.isnan(value):
        return "undefined (constant maps)"
    return f"fails: {REASONS[mode]}" if value >= FAIL_THRESHOLD else "passes"


def _cell(value: float, spread: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f} ± {spread:.3f}"


def sanity_table(summary: dict) -> str:
    mode = summary["mode"]
    where = {"cascading": "after the last cascading step (every randomised layer at random)",
             "independent": "at the independent step of lowest mean Spearman",
             "logit": "the map of a random other class against the target's"}[mode]
    lines = [f"Sanity check ({mode}; Adebayo et al. 2018" + (", Sixt et al. 2020" if mode == "logit" else "") +
             f"): similarity of each row's maps with its original maps, {where}; mean ± std over "
             f"{summary['n_images']} images, target: {summary['target']}, weights seed {summary['weights_seed']}, "
             f"{len(summary['layers'])} step(s). Lower is better. A row whose mean Spearman stays >= "
             f"{FAIL_THRESHOLD:g} fails. `*` = with UCAG.", "",
             "| Methods | step | Spearman | Spearman of abs | SSIM | HOG | verdict |", "|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        step = verdict_step(row, mode)
        cells = " | ".join(_cell(step[f], step[f"{f}_std"]) for f in FIELDS)
        lines.append(f"| {row['name']} | {step['layer']} | {cells} | {verdict(row, mode)} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path: Path, summary: dict) -> None:
    """One panel per similarity: its mean per step (x labelled by layer) with a ± std band; base rows dashed,
    UCAG rows solid."""
    plt = _pyplot()
    layers = summary["layers"]
    steps = np.arange(len(layers))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110, sharex=True)
    every = max(1, math.ceil(len(layers) / 20))  # at most ~20 tick labels
    for axis, name in zip(axes.ravel(), FIELDS, strict=True):
        for row in summary["rows"]:
            mean = np.array([step[name] for step in row["steps"]], dtype=float)
            spread = np.array([step[f"{name}_std"] for step in row["steps"]], dtype=float)
            style = "-" if row["ucag"] else "--"
            line, = axis.plot(steps, mean, style, marker="o" if len(steps) < 3 else None, label=row["name"])
            axis.fill_between(steps, mean - spread, mean + spread, color=line.get_color(), alpha=0.15)
        axis.set_title(f"{LABELS[name]}, mean ± std of {summary['n_images']} images", fontsize=10)
        axis.set_ylim(-1.05, 1.05)
        axis.axhline(0, color="grey", lw=0.5)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.set_xticks(steps[::every], [layers[i] for i in steps[::every]], rotation=90, fontsize=6)
    fig.suptitle(f"{summary['mode']} sanity check, {summary['model']} {summary['method']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def map_steps(count: int, mode: str) -> list[int]:
    """The steps sanity_maps.png shows: all, or at most MAX_MAP_COLUMNS - 2 evenly spaced ones ending with the
    last (the first two columns hold the image and the original map)."""
    room = MAX_MAP_COLUMNS - 2
    if count <= room:
        return list(range(count))
    return sorted({int(round(v)) for v in np.linspace(0, count - 1, room)})


def plot_maps(path: Path, task, records: Collection[dict], summary: dict) -> str:
    """Adebayo et al.'s figure for the first image: the image, its original map, its map after each shown step
    ([0, 1] min-max maps), a line per row. Returns the note on which steps are shown."""
    plt = _pyplot()
    record = next(iter(records))
    wanted = map_steps(len(summary["layers"]), summary["mode"])
    image, columns = task.figure_maps(record, wanted)
    names = [row["name"] for row in summary["rows"]]
    count = 2 + len(wanted)
    fig, axes = plt.subplots(len(names), count, figsize=(1.6 * count, 1.8 * len(names)), dpi=110, squeeze=False)
    titles = ["image", "original"] + [summary["layers"][k] for k in wanted]
    for i, name in enumerate(names):
        axes[i, 0].imshow(image)
        for j, picture in enumerate(columns[name]):
            axes[i, j + 1].imshow(picture, cmap="jet", vmin=0, vmax=1)
        for j, axis in enumerate(axes[i]):
            axis.set_xticks([])
            axis.set_yticks([])
            if i == 0:
                axis.set_title(titles[j], fontsize=6, rotation=20)
        axes[i, 0].set_ylabel(name, fontsize=8)
    shown = len(wanted) < len(summary["layers"])
    note = (f"steps shown: {len(wanted)} of {len(summary['layers'])}, evenly spaced, the last included"
            if shown else f"every step shown ({len(wanted)})")
    fig.suptitle(f"{record['file']}: {summary['mode']}; {note}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return note


def write_sanity_report(task, out: Path, records: Collection[dict], skipped: list[dict], summary: dict) -> None:
    write_per_image(out / "per_image.csv", records, summary)
    write_skipped(out / "skipped.txt", skipped)
    write_text(out / "summary.json", json.dumps(_clean(summary), indent=2) + "\n")
    table = sanity_table(summary)
    plot_curves(out / "sanity_curves.png", summary)
    note = plot_maps(out / "sanity_maps.png", task, records, summary)
    table += f"\nsanity_maps.png: the first image ({next(iter(records))['file']}); {note}.\n"
    write_text(out / "table.md", table)
    print(table)
