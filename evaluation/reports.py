"""Writing a finished run: per_image.csv / per_class.csv, summary.json, table.md (every table in the paper's
layout lives here), curves.png, skipped.txt.

Every report file is written whole or not at all (a temporary file renamed over it) and as UTF-8 with
``surrogateescape``: a file name that is not valid UTF-8 (Python's surrogate escapes, e.g. '\\udce9' for
byte 0xE9) is written back as its original bytes. A write that fails (disk full) is a one-line error.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common.errors import OutputError
from common.files import write_atomic
from common.images import display_path
from evaluation.errors import StoreError

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def _replace_with(path: Path, data: bytes) -> None:
    """Write ``data`` whole or not at all (:func:`common.files.write_atomic`); a refused write says that the
    run's records are safe."""
    try:
        write_atomic(path, lambda handle: handle.write(data))
    except OutputError as exc:
        raise StoreError(f"{exc}; the records in {display_path(str(path.parent / 'parts'))} are kept, rerun to "
                         "write the report") from None


@contextmanager
def open_report(path: Path, newline: str | None = "") -> Iterator[io.TextIOBase]:
    """A text handle whose content replaces ``path`` when the block ends without an error."""
    buffer = io.BytesIO()
    text = io.TextIOWrapper(buffer, newline=newline, write_through=True, **ENCODING)
    yield text
    text.flush()
    _replace_with(Path(path), buffer.getvalue())


def write_text(path: Path, content: str) -> None:
    _replace_with(Path(path), content.encode(**ENCODING))

PAPER = json.loads((Path(__file__).resolve().parent / "resources" / "paper_tables.json").read_text())
PAPER_MODEL = {"resnet50": "resnet50", "densenet121": "densenet121", "inception_v3": "inception_v3"}
DENSITY_MODEL = {"resnet50": "resnet50", "densenet121": "densenet", "inception_v3": "inceptionv3"}


def write_per_image(path: Path, results: list[dict], row_names: Sequence[str], fields: Sequence[str]) -> None:
    with open_report(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "target"] + [f"{row}_{field}" for row in row_names for field in fields])
        for record in results:
            values = [record["rows"][row][field] for row in row_names for field in fields]
            writer.writerow([record["file"], record["target"]] + [f"{v:.6f}" for v in values])


def write_skipped(path: Path, skipped: list[dict]) -> None:
    write_text(path, "".join(f"{record['key']}\t{record['skipped']}\n" for record in skipped))


def write_summary(path: Path, summary: dict) -> None:
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value
    rows = [{k: clean(v) for k, v in row.items()} for row in summary["rows"]]
    write_text(path, json.dumps({**summary, "rows": rows}, indent=2) + "\n")


def _paper_insdel(model: str, row_name: str) -> str | None:
    table = PAPER["table1_insertion_deletion_imagenet"]
    if model not in PAPER_MODEL or row_name not in table["rows"]:
        return None
    deletion, insertion = table["rows"][row_name][table["columns"].index(PAPER_MODEL[model])]
    return f"{deletion}/{insertion}"


def insdel_table(summary: dict) -> str:
    model = summary["model"]
    paper = [_paper_insdel(model, row["name"]) for row in summary["rows"]]
    with_paper = any(paper)
    lines = [
        "Insertion / deletion games (layout of the paper's Table 1). AUC x100, deletion (lower is better) / "
        f"insertion (higher is better); {summary['n_images']} images, step {summary['step']} px, "
        f"target: {summary['target']}. `*` = with UCAG.",
        "",
        f"| Methods | {model} |" + (" paper |" if with_paper else ""),
        "|---|---|" + ("---|" if with_paper else ""),
    ]
    for row, reference in zip(summary["rows"], paper, strict=True):
        cell = f"{row['deletion']:.1f}/{row['insertion']:.1f}"
        lines.append(f"| {row['name']} | {cell} |" + (f" {reference or '-'} |" if with_paper else ""))
    return "\n".join(lines) + "\n"


def density_table(summary: dict) -> str:
    model = summary["model"]
    table = PAPER["table5_map_density"]
    lines = [
        "Map densities (layout of the paper's Table 5; CAMERAS definition, Eq. 7-8). Positive density: higher "
        f"is better; negative density: lower is better. {summary['n_images']} images, target: "
        f"{summary['target']}. `*` = with UCAG.",
        "",
        "| Metric | " + " | ".join(row["name"] for row in summary["rows"]) + " |",
        "|---|" + "---|" * len(summary["rows"]),
    ]
    for field, label in [("positive", "Positive map density"), ("negative", "Negative map density")]:
        values = " | ".join(f"{row[field]:.2f}" for row in summary["rows"])
        lines.append(f"| {label} ({model}) | {values} |")
    key = DENSITY_MODEL.get(model)
    if key:
        lines += ["", f"Paper, {model}: " + ", ".join(
            f"{field} {dict(zip(table['columns'], table['rows'][f'{field}_{key}'], strict=True))}"
            for field in ("positive", "negative"))]
    return "\n".join(lines) + "\n"


MeanCurves = dict[tuple[str, str], np.ndarray]


def mean_curves(results: Iterable[dict], rows: Sequence[str],
                fields: Sequence[str] = ("deletion_curve", "insertion_curve")) -> tuple[MeanCurves, int]:
    """({(row, curve field): mean curve}, number of images), summed in one pass over the records."""
    sums: dict[tuple[str, str], np.ndarray] = {}
    count = 0
    for record in results:
        count += 1
        for name in rows:
            for field in fields:
                curve = np.asarray(record["rows"][name][field], dtype=float)
                key = (name, field)
                sums[key] = sums[key] + curve if key in sums else curve
    return {key: total / count for key, total in sums.items()}, count


def plot_curves(path: Path, results: Iterable[dict], rows: Sequence[str], summary_rows: list[dict]) -> None:
    """Mean deletion and insertion curves of every row."""
    means, count = mean_curves(results, rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for axis, game in zip(axes, ["deletion", "insertion"], strict=True):
        for name in rows:
            mean = means[(name, f"{game}_curve")]
            auc = next(row[game] for row in summary_rows if row["name"] == name)
            axis.plot(np.linspace(0, 1, len(mean)), mean, label=f"{name} (AUC {auc:.1f})")
        axis.set_title(f"{game.capitalize()} game, mean of {count} images")
        axis.set_xlabel(f"fraction of pixels {'removed' if game == 'deletion' else 'inserted'}")
        axis.set_ylabel("probability of the explained class")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _row_names(summary: dict) -> list[str]:
    return [row["name"] for row in summary["rows"]]


def _write_common(out: Path, results: list[dict], skipped: list[dict], summary: dict, fields: Sequence[str],
                  table: str) -> None:
    write_per_image(out / "per_image.csv", results, _row_names(summary), fields)
    write_skipped(out / "skipped.txt", skipped)
    write_summary(out / "summary.json", summary)
    write_text(out / "table.md", table)
    print(table)


def write_insdel_report(out: Path, results: list[dict], skipped: list[dict], summary: dict) -> None:
    """insdel.py: per_image.csv, skipped.txt, summary.json, table.md and curves.png."""
    _write_common(out, results, skipped, summary, ("deletion", "insertion"), insdel_table(summary))
    plot_curves(out / "curves.png", results, _row_names(summary), summary["rows"])


def write_density_report(out: Path, results: list[dict], skipped: list[dict], summary: dict) -> None:
    """density.py: per_image.csv, skipped.txt, summary.json and table.md."""
    _write_common(out, results, skipped, summary, ("positive", "negative"), density_table(summary))


def markdown_table(caption: str, headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A caption line, a blank line and a Markdown table of ``headers`` and ``rows`` (cells already formatted)."""
    lines = [caption, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def confidence_table(summary: dict) -> str:
    """Average drop %, increase in confidence % and the mean change of the class probability per row."""
    caption = ("Average drop / increase in confidence (Chattopadhay et al. 2018): the image multiplied by its [0, 1] "
               f"map in normalised space; {summary['n_images']} images, target: {summary['target']}. Average drop: "
               "lower is better; increase in confidence: higher is better. `*` = with UCAG.")
    return markdown_table(caption, ("Methods", "Average drop %", "Increase in confidence %", "Mean probability change"),
                          ((row["name"], f"{100 * row['drop']:.2f}", f"{100 * row['increase']:.2f}",
                            f"{row['change']:+.4f}") for row in summary["rows"]))


def plot_confidence(path: Path, summary: dict) -> None:
    """Bars of each row's average drop and increase in confidence (%)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [row["name"] for row in summary["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for axis, field, title in zip(axes, ("drop", "increase"), ("Average drop % (lower is better)",
                                                                 "Increase in confidence % (higher is better)"),
                                  strict=True):
        values = [100 * row[field] for row in summary["rows"]]
        bars = axis.bar(names, values, color=["tab:orange" if row["ucag"] else "tab:blue" for row in summary["rows"]])
        axis.bar_label(bars, fmt="%.1f")
        axis.set_title(f"{title}, {summary['n_images']} images", fontsize=10)
        axis.set_ylim(0, max(100.0, *values) * 1.08)
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_confidence_report(out: Path, results: list[dict], skipped: list[dict], summary: dict) -> None:
    """confidence.py: per_image.csv, skipped.txt, summary.json, table.md and confidence.png."""
    _write_common(out, results, skipped, summary, ("drop", "increase", "change"), confidence_table(summary))
    plot_confidence(out / "confidence.png", summary)


def road_table(summary: dict) -> str:
    """ROAD per row: the MoRF and LeRF curves' means (class probability and still-predicted share), the
    combined score and the unperturbed probability."""
    percentiles = ", ".join(f"{p:g}" for p in summary["percentiles"])
    caption = (f"ROAD (Rong et al. 2022), noisy linear imputation (noise {summary['imputation_noise']:g}) of the "
               f"removed pixels at {percentiles} %; {summary['n_images']} images, target: {summary['target']}. MoRF "
               "(most relevant removed first): lower is better; LeRF (least relevant first) and combined = "
               "(LeRF - MoRF) / 2: higher is better. Means over the percentiles. `*` = with UCAG.")
    headers = ("Methods", "MoRF probability", "LeRF probability", "Combined", "MoRF accuracy %", "LeRF accuracy %",
               "Unperturbed probability")
    return markdown_table(caption, headers, ((row["name"], f"{row['morf']:.4f}", f"{row['lerf']:.4f}",
                                              f"{row['combined']:+.4f}", f"{100 * row['morf_accuracy']:.1f}",
                                              f"{100 * row['lerf_accuracy']:.1f}", f"{row['original']:.4f}")
                                             for row in summary["rows"]))


ROAD_CURVES = ("morf_curve", "lerf_curve", "morf_correct", "lerf_correct")


def plot_road(path: Path, summary: dict) -> None:
    """The mean MoRF and LeRF probability curves of every row against the share removed (base dashed, UCAG
    solid)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    percentiles = summary["percentiles"]
    for axis, order, title in zip(axes, ("morf", "lerf"), ("MoRF: most relevant removed first (lower is better)",
                                                         "LeRF: least relevant removed first (higher is better)"),
                                  strict=True):
        for row in summary["rows"]:
            axis.plot(percentiles, row[f"{order}_mean_curve"], "-" if row["ucag"] else "--", marker="o",
                      label=f"{row['name']} (mean {row[order]:.3f})")
        axis.set_title(f"{title}, {summary['n_images']} images", fontsize=10)
        axis.set_xlabel("pixels removed and imputed (%)")
        axis.set_ylabel("probability of the explained class")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_road_report(out: Path, results: list[dict], skipped: list[dict], summary: dict) -> None:
    """road.py: per_image.csv, skipped.txt, summary.json (with each row's mean curves), table.md and
    road_curves.png."""
    means, _ = mean_curves(results, _row_names(summary), ROAD_CURVES)
    for row in summary["rows"]:
        for field in ROAD_CURVES:
            row[field.replace("_curve", "_mean_curve").replace("_correct", "_mean_correct")] = \
                means[(row["name"], field)].tolist()
    _write_common(out, results, skipped, summary, ("morf", "lerf", "combined", "morf_accuracy", "lerf_accuracy"),
                  road_table(summary))
    plot_road(out / "road_curves.png", summary)


def segmentation_table(summary: dict) -> str:
    """Table 4's layout: mAP and pixel accuracy, original / with UCAG."""
    base = next(r for r in summary["rows"] if not r["ucag"])
    ucag = next((r for r in summary["rows"] if r["ucag"]), None)

    def pair(field: str) -> str:
        return f"{base[field]:.3f}" + (f"/{ucag[field]:.3f}" if ucag else "")

    return "\n".join([
        "ImageNet segmentation (layout of the paper's Table 4): original" + (" / with UCAG" if ucag else "") +
        f"; {summary['n_images']} images, AP protocol '{summary['ap']}'.", "",
        f"| Model | Metric | {summary['method']} |", "|---|---|---|",
        f"| {summary['model']} | mAP | {pair('map')} |",
        f"| {summary['model']} | Pixel Acc. | {pair('pixel_accuracy')} |"]) + "\n"


def write_segmentation_report(out: Path, results: list[dict], skipped: list[dict], summary: dict) -> None:
    """segmentation.py: per_image.csv (correct, labelled pixels and AP per row), skipped.txt, summary.json,
    table.md."""
    _write_common(out, results, skipped, summary, ("correct", "labelled", "ap"), segmentation_table(summary))


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.1f}"


def _paper_pointing(dataset: str, model: str, row_name: str) -> str | None:
    """The paper's Table 2 cell (all/difficult) for a row on ``dataset`` (voc07, coco14) and ``model``
    (vgg16, resnet50); None where the paper has none (our UCAG rows other than Grad-CAM's, NormGrad on COCO)."""
    table = PAPER["table2_pointing_game"]
    column = f"{dataset}_{model}"
    cells = table["rows"].get(row_name)
    if column not in table["columns"] or cells is None or cells[table["columns"].index(column)] is None:
        return None
    every, difficult = cells[table["columns"].index(column)]
    return f"{every}/{difficult}"


def _paper_energy(dataset: str, model: str) -> str | None:
    table = PAPER["table3_energy_pointing_game"]
    family = {"vgg16": "vgg", "resnet50": "resnet"}.get(model)
    key = f"{family}_{dataset}"
    if key not in table["rows"]:
        return None
    return ", ".join(f"{name} {cell}" for name, cell in zip(table["columns"], table["rows"][key], strict=True))


def pointing_tables(summary: dict) -> str:
    """Tables 2 and 3's layouts: pointing accuracy all/difficult per row beside the paper's numbers; energy
    all(difficult), without / with UCAG, and the paper's."""
    column = f"{summary['dataset']} {summary['model']}"
    paper = [_paper_pointing(summary["dataset"], summary["model"], row["name"]) for row in summary["rows"]]
    with_paper = any(paper)
    over = {"torchray": "mean over all classes (TorchRay)",
            "evaluated-classes": "mean over the classes with pairs"}[summary.get("aggregation", "torchray")]
    lines = [f"Pointing game (layout of the paper's Table 2): accuracy %, all/difficult, {over}; "
             f"{summary['n_images']} images, tolerance {summary['tolerance']} px. `*` = with UCAG.", "",
             f"| Methods | {column} |" + (" paper |" if with_paper else ""),
             "|---|---|" + ("---|" if with_paper else "")]
    for row, reference in zip(summary["rows"], paper, strict=True):
        lines.append(f"| {row['name']} | {_cell(row['pointing_all'])}/{_cell(row['pointing_difficult'])} |"
                     + (f" {reference or '-'} |" if with_paper else ""))
    plain = [row for row in summary["rows"] if not row["ucag"]]
    lines += ["", "Energy-based pointing game (layout of the paper's Table 3): all(difficult), without / with UCAG.",
              "", "| Model | Dataset | " + " | ".join(r["name"] for r in plain) + " |",
              "|---|---|" + "---|" * len(plain)]
    cells = []
    for row in plain:
        text = f"{_cell(row['energy_all'])}({_cell(row['energy_difficult'])})"
        with_ucag = next((r for r in summary["rows"] if r["ucag"] and r["name"] == f"{row['name']}*"), None)
        if with_ucag:
            text += f"/{_cell(with_ucag['energy_all'])}({_cell(with_ucag['energy_difficult'])})"
        cells.append(text)
    lines.append(f"| {summary['model']} | {summary['dataset']} | " + " | ".join(cells) + " |")
    energy = _paper_energy(summary["dataset"], summary["model"])
    if energy:
        lines += ["", f"Paper, {summary['model']} {summary['dataset']}: {energy}"]
    return "\n".join(lines) + "\n"
