"""Noisy linear imputation (Rong et al., ICML 2022, ROAD): removed pixels take the weighted mean of their eight
neighbours, known or removed, plus Gaussian noise.

For the removed set U of one image the values x_U solve, per channel, the sparse system

    s_i x_i - sum_{j in N(i) & U} w_ij x_j = sum_{j in N(i) \\ U} w_ij v_j        (i in U)

with w = 1/6 for the four edge neighbours, 1/12 for the four corners, N(i) the neighbours inside the image and
s_i = sum_{j in N(i)} w_ij (1 at an interior pixel). It is the ROAD authors' system (pytorch-grad-cam and Quantus
carry copies of their imputer) with both sides negated: here it is symmetric positive definite whenever one
pixel is kept, and solved by a sparse LU on the host in float64: SuperLU in its symmetric mode (minimum-degree
ordering of A + A^T, diagonal pivots: an SPD matrix needs no pivoting), 1.5 x faster than its general mode
and 2 x faster than ``spsolve``'s default column ordering on these systems. The system is built with array
operations, one pass per neighbour offset. Noise: ``noise`` x N(0, 1) added to every imputed value (the
authors' 0.01, absolute, in the space the image is given in: the model's normalised input here, as both peers).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sparse
from scipy.sparse.linalg import splu

# (row offset, column offset) -> weight: the ROAD authors' neighbourhood (sums to 1)
NEIGHBOUR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                     ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
# SuperLU's column ordering: minimum degree on A + A^T (A is symmetric)
ORDERING = "MMD_AT_PLUS_A"


def imputation_system(image: np.ndarray, removed: np.ndarray) -> tuple[sparse.csc_matrix, np.ndarray]:
    """(A, b) of the removed pixels of one (C, H, W) image: A (n, n) symmetric positive definite, b (n, C);
    ``removed``: (H*W,) flat indices of the n removed pixels, in raster order."""
    channels, height, width = image.shape
    count = len(removed)
    pixels = image.reshape(channels, -1)
    variable = np.full(height * width, -1, dtype=np.int64)
    variable[removed] = np.arange(count)
    rows, columns = np.divmod(removed, width)
    diagonal = np.zeros(count)
    right = np.zeros((count, channels))
    entry_rows, entry_columns, entry_values = [], [], []
    for (down, across), weight in NEIGHBOUR_WEIGHTS:
        row, column = rows + down, columns + across
        inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
        equation = np.flatnonzero(inside)  # each equation meets this offset's neighbour once: no repeats
        neighbour = row[inside] * width + column[inside]
        diagonal[equation] += weight
        unknown = variable[neighbour] >= 0
        entry_rows.append(equation[unknown])
        entry_columns.append(variable[neighbour[unknown]])
        entry_values.append(np.full(int(unknown.sum()), -weight))
        right[equation[~unknown]] += weight * pixels[:, neighbour[~unknown]].T
    entry_rows.append(np.arange(count))
    entry_columns.append(np.arange(count))
    entry_values.append(diagonal)
    positions = (np.concatenate(entry_rows), np.concatenate(entry_columns))
    matrix = sparse.csc_matrix((np.concatenate(entry_values), positions), shape=(count, count))
    return matrix, right


def linear_fill(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """(n, C) float64 values of the pixels at the flat indices ``removed`` of the (C, H, W) ``image``, imputed
    without noise. SuperLU releases the GIL: threads solve several systems at once."""
    if not len(removed):
        return np.zeros((0, image.shape[0]))
    matrix, right = imputation_system(np.asarray(image, dtype=np.float64), removed)
    return splu(matrix, permc_spec=ORDERING, diag_pivot_thresh=0.0, options={"SymmetricMode": True}).solve(right)


def check_removed(shape: tuple[int, ...], removed: np.ndarray) -> None:
    if len(removed) >= shape[-2] * shape[-1]:
        raise ValueError("noisy linear imputation needs at least one kept pixel")


def fill_in(image: np.ndarray, removed: np.ndarray, values: np.ndarray, noise: float,
            rng: np.random.Generator | None) -> np.ndarray:
    """A float64 copy of the (C, H, W) ``image`` with ``values`` (n, C) at the flat indices ``removed``, plus
    ``noise`` x N(0, 1) from ``rng`` (none when ``noise`` is 0)."""
    channels = image.shape[0]
    out = np.array(image, dtype=np.float64).reshape(channels, -1)
    if len(removed):
        if noise:
            values = values + noise * rng.standard_normal(values.shape)
        out[:, removed] = values.T
    return out.reshape(image.shape)


def impute(image: np.ndarray, removed: np.ndarray, noise: float, rng: np.random.Generator | None) -> np.ndarray:
    """A float64 copy of the (C, H, W) ``image`` whose pixels at the flat indices ``removed`` are imputed
    (plus ``noise`` x N(0, 1) from ``rng``; no noise when ``noise`` is 0). At least one pixel must be kept."""
    check_removed(image.shape, removed)
    return fill_in(image, removed, linear_fill(image, removed), noise, rng)
