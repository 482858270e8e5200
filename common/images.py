"""Finding image files and reading them as 8-bit RGB, whatever their mode or bit depth."""
from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}

# The largest image decoded, in pixels (width x height): Pillow's own refusal threshold (twice its default
# Image.MAX_IMAGE_PIXELS), about 13400 x 13400; such an RGB image takes 537 MB. Larger files are not decoded:
# load_rgb raises ImageError (a skip in a folder run, a one-line error for a single file).
MAX_PIXELS = 178_956_970


def display_path(path: str | Path) -> str:
    """``path`` as printable text: bytes of a file name that are not UTF-8 (held by Python as surrogate
    escapes, e.g. ``caf\\udce9.png``) are written as ``\\xNN`` (``caf\\xe9.png``), so messages, keys and
    report files can always be encoded as UTF-8. Other names are returned unchanged."""
    text = os.fspath(path)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _folder_id(path: str | Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def find_images(path: str | Path, outputs: Sequence[str | Path] = ()) -> list[Path]:
    """Image files at ``path``: the file itself, or every image file below a folder (recursive, sorted);
    see :func:`find_image_names`."""
    return [Path(name) for name in find_image_names(path, outputs)]


def _parts(name: str) -> list[str]:
    """The sort key that orders path strings as :class:`pathlib.Path` orders them (component by component)."""
    return name.split(os.sep)


def find_image_names(path: str | Path, outputs: Sequence[str | Path] = ()) -> list[str]:
    """Image files at ``path`` as path strings: the file itself, or every image file below a folder
    (recursive), sorted as Paths sort (by component; strings, not Path objects, are built and compared: 50k
    files in 1000 folders list in a fraction of a second).

    Symbolic links to folders are followed, each real folder walked once (a link back to a folder already
    walked, a loop, is not followed again). A link with an image suffix whose target is missing or loops is
    listed anyway, so that reading it fails with a reason (:func:`load_rgb`) instead of the file vanishing.
    A folder that cannot be listed is a warning. ``outputs``: the run's output folders; outputs are never
    inputs, so these folders (however reached) are not walked, with a warning when one lies below ``path``.
    """
    path = Path(path)
    skip = {key: folder for folder in outputs if (key := _folder_id(folder)) is not None}
    if not path.exists() and not path.is_symlink():
        raise ImageError(f"image path does not exist: {display_path(path)}")
    if not path.is_dir():
        return [str(path)]

    def unlisted(exc: OSError) -> None:
        warnings.warn(f"cannot list folder {display_path(exc.filename or '?')}: {exc.strerror}; its images are "
                      "left out", stacklevel=3)

    files: list[str] = []
    walked: set[tuple[int, int]] = set()
    links = [str(path)]  # folders to walk: the root, then links to folders found on the way (real folders first)
    while links:
        found = []
        for top in sorted(links):
            for folder, subfolders, names in os.walk(top, onerror=unlisted):
                try:
                    info = os.stat(folder)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) in walked:  # reached again through a link: a loop or a second way in
                    subfolders[:] = []
                    continue
                if (info.st_dev, info.st_ino) in skip:
                    warnings.warn(f"{display_path(folder)} is an output folder of this run: its files are not "
                                  "inputs and are left out", stacklevel=2)
                    walked.add((info.st_dev, info.st_ino))
                    subfolders[:] = []
                    continue
                walked.add((info.st_dev, info.st_ino))
                found += [os.path.join(folder, name) for name in subfolders
                          if os.path.islink(os.path.join(folder, name))]
                for name in names:
                    if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                        continue
                    candidate = os.path.join(folder, name)
                    if os.path.isfile(candidate) or (os.path.islink(candidate) and not os.path.exists(candidate)):
                        files.append(candidate)
        links = found
    files.sort(key=_parts)
    if not files:
        raise ImageError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {display_path(path)}")
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
    EXIF orientation is applied. Unreadable files (missing, broken or looping links, not an image, truncated,
    more than :data:`MAX_PIXELS` pixels) raise :class:`ImageError`.
    """
    path = Path(path)
    shown = display_path(path)
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
            kind = "broken"
        except OSError as exc:
            kind = "looping" if exc.errno == errno.ELOOP else "broken"
        raise ImageError(f"{kind} symbolic link {shown} -> {display_path(os.readlink(path))}")
    if path.is_dir():
        raise ImageError(f"{shown} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(_too_large(shown, f"{img.width} x {img.height} = {img.width * img.height}"))
                img = ImageOps.exif_transpose(img)
                img.load()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {shown}") from None
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageError(_too_large(shown, pixels.group(1) if pixels else str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on a user's file is an unreadable file
        raise ImageError(f"cannot read image {shown}: {exc.__class__.__name__}: {display_path(str(exc))}") from None
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
        raise ImageError(f"image has no pixels: {shown}")
    return np.array(array, dtype=np.uint8, order="C")  # a writable copy


def _too_large(shown: str, size: str) -> str:
    return (f"image {shown} is too large: {size} pixels, more than the limit of {MAX_PIXELS} "
            "(common.images.MAX_PIXELS)")
