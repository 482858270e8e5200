"""The ImageNet segmentation set (Guillaumin et al. 2014; 4276 images) as ``gtsegs_ijcv.mat``.

MATLAB v7.3 = HDF5, read with h5py: ``value/img`` holds (N, 1) object references to uint8 images stored
as (3, W, H) (MATLAB's column-major order), ``value/gt`` holds (N, 1) references to (1, 1) reference
arrays whose target is the (W, H) binary mask. The file is opened lazily in each DataLoader worker.

A file without these two reference datasets (numbers instead of references, different lengths) is a
:class:`DataError` when opened; an item whose references do not lead to a (3, W, H) image and a (W, H) mask
of the same size, or whose pixels have no known scale (:func:`to_uint8`), becomes a skip record with the reason.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.images import display_path
from evaluation.errors import DataError


def to_uint8(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An image of the file as uint8 by its dtype: uint8 as is; floats with values in [0, 1] scaled by 255 and
    rounded, floats in [0, 255] rounded; other integers with values in 0..255 as is. Anything else (bool,
    non-finite values, values outside these ranges) is (image, the reason) and is not converted."""
    if image.dtype == np.uint8:
        return image, None
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        return image, f"is a {image.dtype} array, not uint8, float or integer pixels"
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        return image, f"holds non-finite {image.dtype} values"
    low, high = image.min(), image.max()
    if np.issubdtype(image.dtype, np.floating) and low >= 0 and high <= 1:
        return np.rint(image.astype(np.float64) * 255).astype(np.uint8), None
    if low >= 0 and high <= 255:
        return np.rint(image).astype(np.uint8), None
    return image, (f"holds {image.dtype} values in [{low:g}, {high:g}], neither [0, 1] nor [0, 255]: its scale is "
                   "unknown")


class ImageNetSegmentation:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        shown = display_path(self.path)
        if not self.path.is_file():
            raise DataError(f"segmentation file not found: {shown} (gtsegs_ijcv.mat)")
        import h5py
        try:
            with h5py.File(self.path, "r") as handle:
                shapes = {}
                for name in ("value/img", "value/gt"):
                    dataset = handle.get(name)
                    if not isinstance(dataset, h5py.Dataset):
                        raise DataError(f"{shown} has no value/img and value/gt datasets (is it gtsegs_ijcv.mat?)")
                    if h5py.check_dtype(ref=dataset.dtype) is not h5py.Reference:
                        raise DataError(f"{shown}: {name} holds {dataset.dtype} values, not object references "
                                        "(is it gtsegs_ijcv.mat?)")
                    if dataset.ndim != 2 or dataset.shape[1] < 1:
                        raise DataError(f"{shown}: {name} has shape {dataset.shape}, expected (N, 1) references")
                    shapes[name] = dataset.shape[0]
                if shapes["value/img"] != shapes["value/gt"]:
                    raise DataError(f"{shown}: value/img holds {shapes['value/img']} images but value/gt "
                                    f"{shapes['value/gt']} masks")
                self.count = int(shapes["value/img"])
        except OSError as exc:
            raise DataError(f"cannot open {shown} as MATLAB v7.3/HDF5: {exc}") from None
        if self.count == 0:
            raise DataError(f"{shown} holds no images")
        self._handle = None

    def keys(self) -> list[str]:
        return [f"{index:05d}" for index in range(self.count)]

    def _file(self):
        if self._handle is None:
            import h5py
            self._handle = h5py.File(self.path, "r")
        return self._handle

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None  # each worker opens its own handle
        return state

    def load(self, key: str) -> dict:
        index = int(key)
        name = display_path(self.path.name)
        try:
            handle = self._file()
            image = np.array(handle[handle["value/img"][index, 0]])
            mask = np.array(handle[handle[handle["value/gt"][index, 0]][0, 0]])
        except (KeyError, ValueError, OSError, TypeError, IndexError, AttributeError) as exc:
            return {"key": key, "error": f"cannot read image {index} of {name}: {exc.__class__.__name__}: {exc}"}
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[0] == 3)) or image.size == 0 or \
                not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
            return {"key": key, "error": f"image {index} of {name} is a {image.dtype} array of shape {image.shape}, "
                                         "not a (3, W, H) or (W, H) image"}
        if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool):
            return {"key": key, "error": f"mask {index} of {name} is a {mask.dtype} array of shape {mask.shape}, "
                                         "not a (W, H) mask"}
        image = image.T if image.ndim == 2 else image.transpose(2, 1, 0)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        image, problem = to_uint8(image)
        if problem:
            return {"key": key, "error": f"image {index} of {name} {problem}"}
        mask = mask.T
        if mask.shape != image.shape[:2]:
            return {"key": key, "error": f"mask {mask.shape} and image {image.shape[:2]} of item {index} differ"}
        return {"key": key, "image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask > 0)}
