#!/usr/bin/env python
"""What pytorch-grad-cam's normalised maps do to UCAG: the Pearson correlation of the final UCAG map folded
from the library's raw crop maps and from its normalised ones (ReLU, per-crop min-max, cv2 resize), on the
bundled photos with the paper's geometry (n = 6, alpha = 2.6, c = 124), embedded model.

    python benchmarks/gradcam_lib_normalisation.py [--methods GradCAM GradCAMPlusPlus EigenCAM]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.images import load_rgb  # noqa: E402
from methods.adapters import GradCamLibExplainer  # noqa: E402
from models import load_model, preprocess  # noqa: E402
from ucag import UCAG  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["GradCAM", "GradCAMPlusPlus", "EigenCAM"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    spec = load_model("efficientnet_lite0")
    files = sorted(EXAMPLES.iterdir())
    x = preprocess([load_rgb(path) for path in files], spec, "cpu")
    with torch.no_grad():
        targets = spec.model(x).argmax(dim=1)
    for name in args.methods:
        finals = []
        for normalised in (False, True):
            ucag = UCAG(GradCamLibExplainer(spec.model, name, spec.layer, normalised=normalised))
            finals.append(ucag.finalize(ucag(x, targets).maps, tuple(x.shape[-2:])).flatten(1))
        correlation = torch.corrcoef(torch.cat(finals))[:len(files), len(files):].diagonal()
        shown = ", ".join(f"{path.stem} {value:.3f}" for path, value in zip(files, correlation.tolist(), strict=True))
        print(f"{name}: Pearson r of the UCAG maps, raw vs normalised crop maps: {shown}; "
              f"mean {correlation.mean():.3f}")


if __name__ == "__main__":
    main()
