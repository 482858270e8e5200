"""The ImageNet segmentation set (Guillaumin et al. 2014; 4276 images) as ``gtsegs_ijcv.mat``.

MATLAB v7.3 = HDF5, read with h5py: ``value/img`` holds (N, 1) object references to uint8 images stored
as (3, W, H) (MATLAB's column-major order), ``value/gt`` holds (N, 1) references to (1, 1) reference
arrays whose target is the (W, H) binary mask. The file is opened lazily in each DataLoader worker.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.errors import DataError


class ImageNetSegmentation:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"segmentation file not found: {self.path} (gtsegs_ijcv.mat)")
        import h5py
        try:
            with h5py.File(self.path, "r") as handle:
                if "value/img" not in handle or "value/gt" not in handle:
                    raise DataError(f"{self.path} has no value/img and value/gt datasets (is it gtsegs_ijcv.mat?)")
                self.count = int(handle["value/img"].shape[0])
        except OSError as exc:
            raise DataError(f"cannot open {self.path} as MATLAB v7.3/HDF5: {exc}") from None
        if self.count == 0:
            raise DataError(f"{self.path} holds no images")
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
        try:
            handle = self._file()
            image = np.array(handle[handle["value/img"][index, 0]])
            mask = np.array(handle[handle[handle["value/gt"][index, 0]][0, 0]])
        except (KeyError, ValueError, OSError) as exc:
            return {"key": key, "error": f"cannot read image {index} of {self.path.name}: {exc}"}
        image = image.T if image.ndim == 2 else image.transpose(2, 1, 0)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        mask = mask.T
        if mask.shape != image.shape[:2]:
            return {"key": key, "error": f"mask {mask.shape} and image {image.shape[:2]} of item {index} differ"}
        return {"key": key, "image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask > 0)}
