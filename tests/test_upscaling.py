"""UCAG's upscaled crops (paper Eq. 1): the CPU's separable path gives PyTorch's bicubic resize of each crop."""
import pytest
import torch
import torch.nn.functional as F

from ucag.geometry import CropGrid
from ucag.upscaling import UpscaledCrops, _axis_weights

GEOMETRIES = [  # (batch, H, W, c, n, alpha)
    (1, 224, 224, 124, 6, 2.6),   # the paper's defaults: 322 px crops
    (2, 224, 300, 124, 6, 2.6),   # non-square images: non-square crops
    (1, 230, 224, 124, 4, 0.7),   # shrinking, and a last crop placed flush with the border
    (1, 224, 224, 100, 5, 1.0),   # alpha 1: the crops themselves
    (3, 64, 80, 64, 8, 3.3),      # crops as large as the image side
]


def kernel_crops(x, grid, size):
    return F.interpolate(grid.unfold(x), size=size, mode="bicubic", align_corners=False)


def chunked(crops, chunk):
    return torch.cat([crops[start:start + chunk] for start in range(0, len(crops), chunk)])


def scaled(grid, alpha):
    return int(grid.crop_size[0] * alpha), int(grid.crop_size[1] * alpha)


@pytest.mark.parametrize("batch,height,width,crop,n,alpha", GEOMETRIES)
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_equals_the_bicubic_kernel_in_float64(batch, height, width, crop, n, alpha, chunk):
    x = torch.randn(batch, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = CropGrid(height, width, crop, n)
    crops = UpscaledCrops(x, grid, scaled(grid, alpha))
    assert (crops.separable or crops.identity) and len(crops) == batch * n * n
    got = chunked(crops, chunk)
    torch.testing.assert_close(got, kernel_crops(x, grid, scaled(grid, alpha)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch,height,width,crop,n,alpha", GEOMETRIES[:3])
def test_float32_is_at_least_as_close_to_exact_as_the_kernel(batch, height, width, crop, n, alpha):
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    grid = CropGrid(height, width, crop, n)
    size = scaled(grid, alpha)
    exact = kernel_crops(x.double(), grid, size)
    ours = chunked(UpscaledCrops(x, grid, size), 8)
    assert ours.dtype == torch.float32
    ours_error = (ours.double() - exact).abs().max().item()
    kernel_error = (kernel_crops(x, grid, size).double() - exact).abs().max().item()
    assert ours_error < 2e-6 and ours_error <= kernel_error + 1e-7


def test_axis_weights_are_the_kernels_and_interpolate():
    weights = _axis_weights(124, 322)
    assert weights.shape == (322, 124) and weights.dtype == torch.float64
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(322, dtype=torch.float64))
    assert int(weights.ne(0).sum(dim=1).max()) <= 4            # a cubic kernel: at most 4 taps per output
    assert torch.equal(_axis_weights(50, 50), torch.eye(50, dtype=torch.float64))


def test_autocast_does_not_lower_the_crops_precision():
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    grid = CropGrid(224, 224)
    plain = chunked(UpscaledCrops(x, grid, (322, 322)), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = chunked(UpscaledCrops(x, grid, (322, 322)), 8)
    assert under_autocast.dtype == torch.float32 and torch.equal(plain, under_autocast)


def test_other_devices_use_the_kernel_itself():
    x = torch.rand(1, 3, 224, 224, device="meta")
    crops = UpscaledCrops(x, CropGrid(224, 224), (322, 322))
    assert not crops.separable and crops[0:8].shape == (8, 3, 322, 322) and crops[0:8].device.type == "meta"


def test_alpha_one_cuts_the_crops_without_interpolating():
    """alpha = 1: bicubic at scale 1 is the identity, so the crops are the unfolded crops themselves (no
    interpolation pass), on the CPU path and the kernel path alike."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 56, 56)
    grid = CropGrid(56, 56, 124, 2)
    crops = UpscaledCrops(x, grid, grid.crop_size)
    assert crops.identity and crops._bands is None
    assert torch.equal(crops[0:len(crops)], grid.unfold(x))
    reference = F.interpolate(grid.unfold(x), size=grid.crop_size, mode="bicubic", align_corners=False)
    assert torch.allclose(crops[1:7], reference[1:7], atol=1e-6)
