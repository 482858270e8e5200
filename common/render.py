"""Pictures people look at: heat-map overlays and side-by-side panels with titles (OpenCV)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from common.files import save_png

PANEL_HEIGHT = 300
TITLE_HEIGHT = 26
# A panel is at most MAX_ASPECT times as wide as high and at least 1/MAX_ASPECT as wide: an image beyond (10000 x 1
# px) is letterboxed into that box on white, so a picture's memory stays bounded (unscaled: 3,000,000 x 326 px).
MAX_ASPECT = 4


def overlay(image: np.ndarray, heat: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map (H, W) over an RGB uint8 image (H, W, 3) with the jet colormap."""
    colored = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - weight, colored, weight, 0)


def signed_overlay(image: np.ndarray, relevance: np.ndarray, weight: float = 0.75) -> np.ndarray:
    """A [-1, 1] relevance map over the image's gray version: red positive, blue negative, white zero
    (the paper's Figure 4 colours)."""
    value = np.clip(relevance, -1, 1)[..., None]
    white = np.ones_like(value)
    red, blue = np.concatenate([white, 1 - value, 1 - value], -1), np.concatenate([1 + value, 1 + value, white], -1)
    colored = np.where(value >= 0, red, blue) * 255
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(np.float32)
    strength = weight * np.abs(value)
    blended = gray * (1 - strength) + colored * strength
    return np.clip(blended, 0, 255).astype(np.uint8)


def drawable(text: str) -> str:
    """``text`` as OpenCV's Hershey fonts can draw it: ASCII, anything else (accents, the surrogate escapes
    Python uses for file-name bytes that are not UTF-8) shown as '?'. Such characters crash cv2.putText."""
    return text.encode("ascii", errors="replace").decode("ascii")


def _fitted(image: np.ndarray) -> np.ndarray:
    """``image`` scaled to PANEL_HEIGHT rows, keeping its aspect; letterboxed when that is beyond MAX_ASPECT."""
    height, width = image.shape[:2]
    scale = min(PANEL_HEIGHT / height, MAX_ASPECT * PANEL_HEIGHT / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if size[1] == PANEL_HEIGHT and size[0] >= PANEL_HEIGHT // MAX_ASPECT:
        return image
    box = np.full((PANEL_HEIGHT, max(size[0], PANEL_HEIGHT // MAX_ASPECT), 3), 255, np.uint8)
    top, left = (box.shape[0] - size[1]) // 2, (box.shape[1] - size[0]) // 2
    box[top:top + size[1], left:left + size[0]] = image.reshape(size[1], size[0], 3)
    return box


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    panel = _fitted(panel)
    strip = np.full((TITLE_HEIGHT, panel.shape[1], 3), 255, np.uint8)
    title = drawable(title)
    font_scale = 0.5

    def text_width(scale: float) -> int:
        return cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]

    while font_scale > 0.3 and text_width(font_scale) > panel.shape[1] - 8:
        font_scale -= 0.05
    cv2.putText(strip, title, (4, TITLE_HEIGHT - 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([strip, panel])


def save_panels(path: Path, panels: Sequence[tuple[np.ndarray, str]], header: str = "") -> None:
    """Write RGB panels side by side, each under its title, with an optional header line, as PNG."""
    row = [_titled(image, title) for image, title in panels]
    gap = np.full((row[0].shape[0], 6, 3), 255, np.uint8)
    figure = row[0]
    for panel in row[1:]:
        figure = np.hstack([figure, gap, panel])
    if header:
        strip = np.full((TITLE_HEIGHT + 4, figure.shape[1], 3), 255, np.uint8)
        cv2.putText(strip, drawable(header), (4, TITLE_HEIGHT - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1,
                    cv2.LINE_AA)
        figure = np.vstack([strip, figure])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(path, figure)
