"""Finding image files and reading them as 8-bit RGB, whatever their mode or bit depth."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}


def find_images(path: str | Path) -> list[Path]:
    """Image files at ``path``: the file itself, or every image file below a folder (recursive, sorted)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image path does not exist: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    return files


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel values of any bit depth to 0..255."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        hi = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        return np.clip(array / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    # 16/32-bit integer images: scale by the type's range when it is used, else by 8 bits.
    top = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _flatten_alpha(rgba: Image.Image) -> Image.Image:
    """Composite a picture with transparency over white (what a viewer shows)."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read ``path`` as an (H, W, 3) uint8 RGB array.

    Grayscale, palette, RGBA/LA (composited over white), CMYK, 16-bit and float images are converted;
    EXIF orientation is applied. Unreadable files raise :class:`ImageError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = _flatten_alpha(img.convert("RGBA"))
    if img.mode in ("RGB", "L"):
        array = np.asarray(img)
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1"):
        array = _to_uint8(np.asarray(img))
    else:  # CMYK, YCbCr, LAB, HSV ...
        array = np.asarray(img.convert("RGB"))
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(f"image has no pixels: {path}")
    return np.array(array, dtype=np.uint8, order="C")  # a writable copy
