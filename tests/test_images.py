"""Reading any image file as 8-bit RGB; finding images in folders."""
import numpy as np
import pytest
from PIL import Image

from common.errors import ImageError
from common.images import find_images, load_rgb


def test_grayscale_is_replicated(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and rgb[5, 7, 1] == 47


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rgb = load_rgb(path)
    assert tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[3, 3]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (5, 5), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.info["transparency"] = 0
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    assert tuple(load_rgb(path)[2, 2]) == (10, 20, 30)


def test_16_bit_grayscale_is_scaled(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)).save(path)
    rgb = load_rgb(path)
    assert rgb[0, 0, 0] == 0 and rgb[0, 1, 0] == 255 and rgb[1, 0, 0] == 128


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (8, 8, 3) and rgb[0, 0, 0] > 200 and rgb[0, 0, 1] < 60


def test_unreadable_and_missing_files(tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ImageError, match="cannot read image"):
        load_rgb(corrupt)
    with pytest.raises(ImageError, match="not found"):
        load_rgb(tmp_path / "missing.png")


def test_find_images(tmp_path):
    (tmp_path / "n01" / "deep").mkdir(parents=True)
    for name in ["n01/a.JPEG", "n01/deep/b.png", "c.txt", "d.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["d.jpg", "n01/a.JPEG", "n01/deep/b.png"]
    with pytest.raises(ImageError, match="does not exist"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no image files"):
        find_images(tmp_path / "empty")
