"""One self-contained HTML page of tables, figures and picture galleries (a study's report.html).

Every picture is inlined as a data: URL and the page links nothing outside itself (no fonts, scripts or styles
from the web), so the file can be mailed, archived or opened offline. Tables marked sortable sort by a click
on a column header (numbers as numbers, the rest as text, a second click reverses); ``#sort=<column>`` or
``#sort=-<column>`` in the page's address sorts the first sortable table on load (a link to a sorted view).
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.files import write_text


@dataclass(frozen=True)
class Table:
    """A table of formatted cells; ``sortable``: its columns sort by a click on the header."""

    caption: str
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]
    sortable: bool = False


@dataclass(frozen=True)
class Figure:
    """A PNG file shown at its own size (at most the page's width)."""

    caption: str
    path: Path


@dataclass(frozen=True)
class Gallery:
    """A grid of PNG files: one line per (label, pictures), a header of column names above."""

    caption: str
    columns: Sequence[str]
    rows: Sequence[tuple[str, Sequence[Path | None]]] = field(default_factory=list)


Block = Table | Figure | Gallery | str  # a str is a paragraph of plain text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th.sortable { cursor: pointer; background: #f3f3f3; } th.sortable:hover { background: #e4e4e4; }
figure { margin: 0.5em 0 1.5em; } figcaption { font-size: 0.9em; color: #555; margin-top: 0.3em; }
img { max-width: 100%; }
.gallery td, .gallery th { text-align: center; vertical-align: top; } .gallery img { width: 180px; }
"""

# Sort a table by one column: numbers as numbers (a trailing % or sign allowed), the rest as text.
SCRIPT = """
function cellValue(row, column) {
  const text = row.cells[column].textContent.trim();
  const number = parseFloat(text.replace(/[%+]/g, ''));
  return isNaN(number) ? text.toLowerCase() : number;
}
function sortTable(table, column, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = cellValue(a, column), y = cellValue(b, column);
    const order = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
    return descending ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
  table.dataset.sorted = (descending ? '-' : '') + column;
}
document.querySelectorAll('table.sortable').forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach((cell, column) => {
    cell.classList.add('sortable');
    cell.addEventListener('click', () => sortTable(table, column, table.dataset.sorted === String(column)));
  });
});
const wanted = /^#sort=(-?)(\\d+)$/.exec(location.hash);
const first = document.querySelector('table.sortable');
if (wanted && first) sortTable(first, Number(wanted[2]), wanted[1] === '-');
"""


def _image(path: Path | None, alt: str) -> str:
    if path is None:
        return "<span>-</span>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(block: Table) -> str:
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in block.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
                   for row in block.rows)
    kind = ' class="sortable"' if block.sortable else ""
    return (f"<h2>{html.escape(block.caption)}</h2><table{kind}><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _figure(block: Figure) -> str:
    return f"<figure>{_image(block.path, block.caption)}<figcaption>{html.escape(block.caption)}</figcaption></figure>"


def _gallery(block: Gallery) -> str:
    head = "<th></th>" + "".join(f"<th>{html.escape(name)}</th>" for name in block.columns)
    body = "".join(f"<tr><td>{html.escape(label)}</td>"
                   + "".join(f"<td>{_image(path, f'{label} {name}')}</td>"
                             for name, path in zip(block.columns, pictures, strict=True)) + "</tr>"
                   for label, pictures in block.rows)
    return (f'<h2>{html.escape(block.caption)}</h2><table class="gallery"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def render(title: str, blocks: Sequence[Block]) -> str:
    """The page's HTML text."""
    parts = []
    for block in blocks:
        if isinstance(block, Table):
            parts.append(_table(block))
        elif isinstance(block, Figure):
            parts.append(_figure(block))
        elif isinstance(block, Gallery):
            parts.append(_gallery(block))
        else:
            parts.append(f"<p>{html.escape(block)}</p>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}"
            f"<script>{SCRIPT}</script></body></html>\n")


def write_html_report(path: Path, title: str, blocks: Sequence[Block]) -> None:
    """Write the page to ``path`` atomically (a reader never sees half a page)."""
    write_text(Path(path), render(title, blocks))
