"""How every metric script runs: flags -> device, model, rows, output folder, resume check -> the one
evaluation driver (:func:`evaluation.driver.run_task`). A script contributes its parser, a function that
builds its :class:`evaluation.driver.Task` and the settings its numbers depend on."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from app.cli import Parser, Setup, UsageError, add_common_flags, add_eval_flags, build_setup
from evaluation import distributed
from evaluation.datasets import discover
from evaluation.driver import ImageMetric, ImageMetricTask, Task, run_task
from evaluation.store import ResultStore
from models import ModelSpec

# make_task(setup) -> (the task, the settings its numbers depend on beyond the model and method)
MakeTask = Callable[[Setup], tuple[Task, dict]]


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")


def run_evaluation(args: argparse.Namespace, default_out: Callable[[Setup], Path], make_task: MakeTask,
                   on_batch: Callable[[int], None] | None = None,
                   load_spec: Callable[[object], ModelSpec] | None = None) -> int:
    """Build everything from the flags, refuse an output folder of other settings, run the driver."""
    check_limit(args.limit)
    info, args.device = distributed.init(args.device)
    try:
        setup = build_setup(args, load_spec=load_spec)
        task, settings = make_task(setup)
        out = Path(args.out) if args.out else default_out(setup)
        store = ResultStore(out, info.rank)
        store.check_config({**setup.settings(), **settings}, info.is_main)
        if info.is_main:
            print(f"{len(task.items)} items, {info.world} process(es), device {setup.device}; results in {out}/")
        run_task(task, store, info, args.batch_size, args.workers, on_batch)
    finally:
        distributed.finish(info)
    return 0


def results_folder(script: str, args: argparse.Namespace) -> Callable[[Setup], Path]:
    """results/<script>/<model>_<method>[_ucag]: the default --out."""
    return lambda setup: Path("results") / script / f"{args.name}_{setup.method}{'_ucag' if args.ucag else ''}"


def image_metric_parser(prog: str, description: str) -> Parser:
    """The flags of insdel.py and density.py: the common ones plus the dataset flags."""
    parser = Parser(prog=prog, description=description)
    add_common_flags(parser)
    add_eval_flags(parser)
    return parser


def run_image_metric(args: argparse.Namespace, script: str, metric: ImageMetric, fields: Sequence[str],
                     settings: dict, write: Callable[[Path, list[dict], list[dict], dict], None],
                     running: Callable[[list[dict]], str], on_batch: Callable[[int], None] | None = None) -> int:
    """insdel.py and density.py: a per-image metric over ImageNet-style data (class folders, a flat folder with
    labels, or any folder explained for the predicted class)."""

    def make_task(setup: Setup) -> tuple[Task, dict]:
        samples = discover(args.img_path, args.labels, setup.spec.num_classes, need_labels=args.target == "gt")
        target_mode = args.target or ("gt" if samples[0].label is not None else "pred")
        samples = samples[:args.limit] if args.limit else samples
        header = {"model": setup.spec.name, "method": setup.method, "target": target_mode, **settings}
        job = ImageMetricTask(samples, setup.spec, setup.device, setup.rows(), metric, fields, target_mode, header)
        desc = f"{setup.method}{' + UCAG' if setup.ucag else ''}"
        return job.task(write, running, desc), {"target": target_mode,
                                                 "img_path": str(Path(args.img_path).resolve()), **settings}

    return run_evaluation(args, results_folder(script, args), make_task, on_batch)
