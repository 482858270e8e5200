"""UCAG's unfold / fold / duplication matrix Gamma, checked against the paper's geometry."""
import pytest
import torch

from ucag import CropGrid
from ucag.geometry import crop_starts


def test_paper_geometry_224():
    grid = CropGrid(224, 224, crop=124, n=6)
    assert grid.crop_size == (124, 124)
    assert grid.stride == (20, 20)
    assert grid.row_starts == [0, 20, 40, 60, 80, 100]
    boxes = grid.boxes()
    assert len(boxes) == 36
    for i in range(6):
        for j in range(6):
            assert boxes[i * 6 + j] == (20 * i, 20 * j, 20 * i + 124, 20 * j + 124)


def test_unfold_matches_tensor_unfold_and_box_slices():
    grid = CropGrid(224, 224, crop=124, n=6)
    x = torch.randn(2, 3, 224, 224)
    crops = grid.unfold(x).view(2, 36, 3, 124, 124)
    reference = x.unfold(2, 124, 20).unfold(3, 124, 20)  # (B, C, 6, 6, 124, 124)
    reference = reference.permute(0, 2, 3, 1, 4, 5).reshape(2, 36, 3, 124, 124)
    assert torch.equal(crops, reference)
    top, left, bottom, right = grid.boxes()[13]
    assert torch.equal(crops[1, 13], x[1, :, top:bottom, left:right])


def test_duplication_matrix_corners_and_centre():
    gamma = CropGrid(224, 224, crop=124, n=6).duplication()[0, 0]
    for corner in [(0, 0), (0, 223), (223, 0), (223, 223)]:
        assert gamma[corner] == 1
    # rows/cols 100..123 are inside every crop of both axes
    assert torch.all(gamma[100:124, 100:124] == 36)
    assert gamma.max() == 36
    # Gamma is the product of the per-axis counts
    rows = torch.zeros(224)
    for start in range(0, 101, 20):
        rows[start:start + 124] += 1
    assert torch.equal(gamma, rows[:, None] * rows[None, :])


def test_fold_equals_torch_fold_when_stride_divides():
    grid = CropGrid(224, 224, crop=124, n=6)
    patches = torch.randn(2 * 36, 124, 124)
    ours = grid.fold(patches)
    columns = patches.view(2, 36, 124 * 124).transpose(1, 2)
    reference = torch.nn.functional.fold(columns, (224, 224), kernel_size=124, stride=20)
    assert torch.allclose(ours, reference, atol=1e-4)


@pytest.mark.parametrize("size,crop,n", [((224, 224), 124, 6), ((230, 301), 124, 6), ((97, 50), 60, 4),
                                         ((299, 299), 124, 6), ((224, 224), 224, 3)])
def test_fold_of_unfold_divided_by_count_is_identity(size, crop, n):
    grid = CropGrid(*size, crop=crop, n=n)
    x = torch.randn(3, 1, *size)
    crops = grid.unfold(x)[:, 0]
    restored = grid.fold(crops) / grid.duplication()
    assert torch.allclose(restored, x, atol=1e-5)


def test_non_divisible_size_covers_every_pixel():
    grid = CropGrid(230, 301, crop=124, n=6)
    assert grid.crop_size == (127, 166)
    gamma = grid.duplication()
    assert gamma.min() >= 1
    assert grid.row_starts[-1] + grid.crop_size[0] == 230
    assert grid.col_starts[-1] + grid.crop_size[1] == 301
    # all but the last crop keep the official stride
    assert grid.row_starts[:-1] == [0, 20, 40, 60, 80]
    assert grid.col_starts[:-1] == [0, 27, 54, 81, 108]


def test_crop_starts_and_bad_parameters():
    assert crop_starts(10, 10, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        crop_starts(10, 11, 2)
    with pytest.raises(ValueError):
        CropGrid(224, 224, crop=124, n=1)
    with pytest.raises(ValueError):
        CropGrid(224, 224, crop=300, n=6)
    with pytest.raises(ValueError):
        CropGrid(224, 224, crop=0.5, n=6)
