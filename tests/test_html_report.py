"""The self-contained HTML report (evaluation/html_report.py) in a real browser: headless Chromium renders it,
the screenshot is not blank, the DOM holds every table row and every picture, and the sort works."""
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.html_report import Figure, Gallery, Table, render, write_html_report


def chromium() -> str:
    """Debian's chromium (.ci/run installs it); missing: a skip here, a failure under CI."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("CI needs Chromium for the report test (.ci/run installs Debian's chromium package)")
    pytest.skip("no Chromium on this machine (apt-get install -y chromium)")


def browse(page: Path, *flags: str, address: str | None = None) -> subprocess.CompletedProcess:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", *flags, address or page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


class Counter(HTMLParser):
    """Rows of each table, pictures and their sources, and external addresses in a DOM dump."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.sources, self.cells, self._cell = [], 0, [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(0)
        elif tag == "tr" and self.tables:
            self.tables[-1] += 1
        elif tag == "img":
            self.images += 1
        elif tag == "td":
            self._cell = ""
        for name in ("src", "href"):
            if attrs.get(name):
                self.sources.append(attrs[name])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td":
            self.cells.append(self._cell.strip())
            self._cell = None


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def page(tmp_path) -> Path:
    pictures = [picture(tmp_path / f"p{i}.png", i) for i in range(5)]
    blocks = [
        "Two points of a study & a <tag> that must be escaped.",
        Table("Table 1", ("Point", "Deletion", "Insertion"),
              [("alpha=1", "12.5", "60.1"), ("alpha=2", "9.25", "65.0")]),
        Figure("Deletion against alpha", pictures[0]),
        Gallery("Maps", ("gradcam", "gradcam*"), [("chelsea", pictures[1:3]), ("coffee", [pictures[3], None])]),
        Table("Per image", ("Image", "Row", "Deletion"),
              [("chelsea", "gradcam", "12.0"), ("coffee", "gradcam", "3.5"), ("camera", "gradcam", "100.0")],
              sortable=True),
    ]
    path = tmp_path / "report.html"
    write_html_report(path, "Study: demo", blocks)
    return path


def test_the_page_is_self_contained(page):
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", text) and "url(http" not in text
    assert "&lt;tag&gt;" in text and "<tag>" not in text
    assert text.count("data:image/png;base64,") == 4


def test_chromium_renders_every_row_and_picture(page, tmp_path):
    shot = tmp_path / "shot.png"
    browse(page, f"--screenshot={shot}", "--window-size=1200,1600")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.01  # not blank: text and pictures drawn
    dom = browse(page, "--dump-dom").stdout
    counted = Counter()
    counted.feed(dom)
    assert counted.tables == [3, 3, 4]  # header + rows of each table
    assert counted.images == 4 and all(source.startswith("data:image/png;base64,") for source in counted.sources)


def test_the_sortable_table_sorts_numbers_as_numbers(page):
    descending = browse(page, "--dump-dom", address=page.resolve().as_uri() + "#sort=-2").stdout
    counted = Counter()
    counted.feed(descending)
    per_image = counted.cells[-9:]
    assert per_image[2::3] == ["100.0", "12.0", "3.5"]  # as text, "100.0" < "12.0" < "3.5"
    ascending = browse(page, "--dump-dom", address=page.resolve().as_uri() + "#sort=0").stdout
    counted = Counter()
    counted.feed(ascending)
    assert counted.cells[-9:][0::3] == ["camera", "chelsea", "coffee"]


def test_render_is_plain_text_in_and_out():
    text = render("t", [Table("c", ("a",), [(1,)])])
    assert text.startswith("<!DOCTYPE html>") and "<td>1</td>" in text


def test_a_study_page_holds_every_point_row_picture_and_image(tmp_path):
    from evaluation.study_page import write_study_page
    study = {"name": "Scale", "script": "confidence", "points": []}
    for alpha in (1, 2):
        point = tmp_path / f"alpha={alpha}"
        point.mkdir()
        (point / "per_image.csv").write_text("file,target,gradcam_drop,gradcam*_drop\n"
                                             f"a.jpg,1,0.{alpha},0.5\nb.jpg,2,0.3,0.{alpha}\n")
        rows = [{"name": "gradcam", "ucag": False, "drop": 0.1 * alpha}, {"name": "gradcam*", "ucag": True,
                                                                         "drop": 0.2}]
        study["points"].append({"point": point.name, "sweep": {"alpha": alpha}, "argv": [],
                                "summary": {"n_images": 2, "rows": rows}})
    study["points"].append({"point": "alpha=3", "sweep": {"alpha": 3}, "argv": [], "summary": None})
    figure = picture(tmp_path / "plot_drop.png", 9)
    pictures = [("a.jpg", "gradcam", picture(tmp_path / "a.png", 1)),
                ("b.jpg", "gradcam", picture(tmp_path / "b.png", 2))]
    page = write_study_page(tmp_path, study, [figure], pictures)
    counted = Counter()
    counted.feed(browse(page, "--dump-dom").stdout)
    # summary: header + 2 points x 2 rows + the point not run; gallery: header + 2 images; per image: header + 4
    assert counted.tables == [6, 3, 5]
    assert counted.images == 3
    assert "(not run)" in counted.cells and "alpha=2" in counted.cells
