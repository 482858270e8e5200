"""Every registered method's maps on fixed inputs, through the scripts' own setup (flags -> rows), with and
without UCAG, ``--official`` included: the maps :mod:`tests.test_bitwise_maps` compares bit for bit with
the ones recorded before the refactorings of issue 21 (``tests/fixtures/bitwise_maps.json``: each map's
SHA-256 over its bytes, with its shape, dtype, sum and largest magnitude to say how far a changed map moved).

Regenerate only when a number is meant to change: ``python -m tests.bitwise_maps --write``. A method new to the
registry is recorded with ``python -m tests.bitwise_maps --add NAME ...``, which leaves every recorded map as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bitwise_maps.json"

# cheap settings for the methods that score many masked or rescaled copies (flags, as a user gives them)
FAST = {"rise": ["--masks", "24", "--mask-batch", "10"], "scorecam": ["--mask-batch", "100"],
        "cameras": ["--resolutions", "40", "56"], "igcam": ["--steps", "4"], "sise": ["--mask-batch", "100"],
        "adasise": ["--mask-batch", "100"], "extremal": ["--max-iter", "2"]}
GEOMETRY = ["-a", "2", "-c", "124", "-n", "2"]
# the UCAG variants: name -> flags
VARIANTS = {"plain": [], "ucag": ["--ucag"], "gaussian": ["--ucag", "--blend", "gaussian"],
            "uniform": ["--ucag", "--no-confidence"], "official": ["--ucag", "--official"],
            "official_score": ["--ucag", "--official", "--score"]}
# the methods that explain each crop with hundreds of masked forwards: the variants that cover every branch
# (the plain row; the official code's UCAG with its score weights, its divisor and blur)
COSTLY = {"scorecam", "sise", "adasise", "rsp"}
COSTLY_VARIANTS = ("plain", "official_score")


def specs() -> dict:
    """The seeded random resnet18 and the tiny ViT (transformer methods)."""
    from models import load_model
    from tests.vit_fixtures import tiny_vit_spec
    torch.manual_seed(0)
    return {"cnn": load_model("resnet18", "random"), "vit": tiny_vit_spec()}


def inputs() -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 40, 40, generator=generator), [3, 7]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; the machine's processor string elsewhere): one PyTorch build with the
    same vector capability still rounds differently on another vendor's CPU (its BLAS and oneDNN code paths)."""
    import platform as host
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else host.processor() or host.machine()


def platform() -> dict:
    """What the bits depend on beyond the code: the PyTorch build, the CPU kernels it picks and the CPU."""
    return {"torch": str(torch.__version__), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_model()}


def fingerprint(tensor: torch.Tensor) -> dict:
    """The map's bits (SHA-256 of its contiguous bytes) with its shape, dtype, sum and largest magnitude."""
    tensor = tensor.detach().contiguous()
    return {"sha256": hashlib.sha256(tensor.numpy().tobytes()).hexdigest(), "shape": list(tensor.shape),
            "dtype": str(tensor.dtype), "sum": float(tensor.double().sum()), "absmax": float(tensor.abs().max())}


def compute(methods=None) -> dict[str, torch.Tensor]:
    """{'<method>/<variant>/<row>/<raw|final|ranking>': map} for every registered method."""
    import visualization
    from app.setup import build_setup
    from methods import available_methods
    from methods.postprocess import official_ranking_maps
    from methods.transformer import METHODS as TRANSFORMER_METHODS
    models = specs()
    x, targets = inputs()
    parser = visualization.build_parser()
    maps = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order on every machine
    try:
        for method in methods or available_methods():
            spec = models["vit" if method in TRANSFORMER_METHODS else "cnn"]
            for variant, flags in VARIANTS.items():
                if method in COSTLY and variant not in COSTLY_VARIANTS:
                    continue
                args = parser.parse_args([method, "--device", "cpu", *GEOMETRY, *FAST.get(method, []), *flags])
                setup = build_setup(args, load_spec=lambda device, spec=spec: spec)
                for row in setup.rows():
                    if variant != "plain" and not row.ucag and not args.official:
                        continue  # the plain row again
                    torch.manual_seed(2)
                    raw = row.explainer(x, targets).maps
                    size = tuple(x.shape[-2:])
                    final = (row.explainer.finalize_signed(raw, size) if row.explainer.signed
                             else row.explainer.finalize(raw, size))
                    key = f"{method}/{variant}/{row.name}"
                    maps[f"{key}/raw"], maps[f"{key}/final"] = raw.detach().clone(), final.detach().clone()
                    if args.official and row.explainer.official_raw:
                        maps[f"{key}/ranking"] = official_ranking_maps(raw, size)
    finally:
        torch.set_num_threads(threads)
    return maps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE}")
    parser.add_argument("--add", nargs="+", metavar="METHOD", help=f"record methods new to the registry in {FIXTURE}")
    options = parser.parse_args()
    import warnings
    warnings.simplefilter("ignore")
    if options.write:
        computed = compute()
        FIXTURE.parent.mkdir(exist_ok=True)
        recorded = {"platform": platform(), "maps": {key: fingerprint(value) for key, value in computed.items()}}
        FIXTURE.write_text(json.dumps(recorded, indent=0) + "\n")
        print(f"{len(computed)} maps, {FIXTURE.stat().st_size / 1e3:.0f} kB -> {FIXTURE}")
    elif options.add:
        recorded = json.loads(FIXTURE.read_text())
        if recorded["platform"] != platform():
            raise SystemExit(f"the fixture was recorded on {recorded['platform']}, this is {platform()}: "
                             "add methods on the recording platform")
        known = {key.split("/")[0] for key in recorded["maps"]}
        if known & set(options.add):
            raise SystemExit(f"already recorded: {sorted(known & set(options.add))} (use --write to change numbers)")
        computed = compute(options.add)
        recorded["maps"].update({key: fingerprint(value) for key, value in computed.items()})
        FIXTURE.write_text(json.dumps(recorded, indent=0) + "\n")
        print(f"added {len(computed)} maps of {', '.join(options.add)} -> {FIXTURE}")
