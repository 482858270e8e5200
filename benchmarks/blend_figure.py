#!/usr/bin/env python
"""README's picture of UCAG's two blends: input | Grad-CAM | UCAG constant (the paper) | UCAG gaussian.

    python benchmarks/blend_figure.py                       # examples/coffee.jpg -> docs/ucag_blend.png

Both UCAG maps come from one pass over the crops (``UCAG.explain_blends``), folded each way, on the
embedded model (efficientnet_lite0, CPU), the paper's geometry (a=2.6, c=124, n=6), the predicted class.
The picture is drawn with the scripts' own helpers (common.render), scaled to --width and stored with a
dithered 256-colour palette to stay small (under 200 KiB).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.images import load_rgb  # noqa: E402
from common.render import overlay, save_panels  # noqa: E402
from methods import build_explainer  # noqa: E402
from models import load_model, preprocess  # noqa: E402
from ucag import UCAG  # noqa: E402
from ucag.blending import SIGMA_FRACTION  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(REPO / "examples" / "coffee.jpg"))
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--out", default=str(REPO / "docs" / "ucag_blend.png"))
    parser.add_argument("--width", type=int, default=1400, help="width of the stored picture (px)")
    args = parser.parse_args()
    spec = load_model("efficientnet_lite0")
    explainer = build_explainer(args.method, spec)
    rgb = load_rgb(args.image)
    x = preprocess([rgb], spec, "cpu")
    base = explainer(x)
    target = base.logits.argmax(dim=1)
    ucag = UCAG(explainer)
    both = ucag.explain_blends(x, target, ("constant", "gaussian"))
    size = rgb.shape[:2]

    def shown(maps, finalize):
        return overlay(rgb, finalize(maps, size)[0, 0].numpy())

    panels = [(rgb, "input"), (shown(base.maps, explainer.finalize), args.method),
              (shown(both["constant"].maps, ucag.finalize), "UCAG, blend: constant (paper, sum / Gamma)"),
              (shown(both["gaussian"].maps, ucag.finalize),
               f"UCAG, blend: gaussian (sigma = {SIGMA_FRACTION:g} crop)")]
    name = spec.categories[int(target)]
    out = Path(args.out)
    save_panels(out, panels, header=f"{Path(args.image).name}: {name}, {args.method} on {spec.name}, "
                                     f"UCAG a={ucag.alpha:g} c={ucag.crop:g} n={ucag.n}")
    picture = Image.open(out).convert("RGB")
    if picture.width > args.width:
        picture = picture.resize((args.width, round(picture.height * args.width / picture.width)),
                                 Image.Resampling.LANCZOS)
    palette = picture.quantize(256, method=Image.Quantize.MEDIANCUT)
    picture.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB, {picture.width}x{picture.height})")


if __name__ == "__main__":
    main()
