"""How every metric script runs: flags -> output folder check, device, model, rows, lock, run identity
(resume check) -> the one evaluation driver (:func:`evaluation.driver.run_task`). A script contributes its
parser and one call: :func:`run_image_metric` (insdel.py, density.py), :func:`run_pointing_game`,
:func:`run_segmentation` or :func:`run_sanity`, each building the script's :class:`evaluation.task.Task` and the
settings its numbers depend on."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from app.flags import Parser, UsageError, add_common_flags, add_eval_flags
from app.setup import Setup, build_setup
from common.images import display_path
from evaluation import distributed
from evaluation.datasets import discover
from evaluation.distributed import Dist
from evaluation.driver import run_task
from evaluation.errors import StoreError
from evaluation.image_metric import ImageMetric, ImageMetricTask, ReportWriter
from evaluation.imagenet_seg import ImageNetSegmentation
from evaluation.localization_data import open_dataset, read_difficult_list
from evaluation.pointing_task import PointingGameTask
from evaluation.reuse import ReusedBaseRow
from evaluation.sanity_report import write_sanity_report
from evaluation.sanity_task import SanityTask
from evaluation.segmentation_task import SegmentationTask
from evaluation.store import (
    ABOUT,
    METRIC_VERSIONS,
    RECORD_FORMAT,
    ResultStore,
    check_output_folder,
    file_sha256,
)
from evaluation.task import Task
from models import ModelSpec
from models.multilabel import load_multilabel

# make_task(setup, rank info) -> (the task, the settings its numbers depend on beyond the model and method; an
# 'about' entry in them is recorded in run.json but is not part of the run's identity)
MakeTask = Callable[[Setup, Dist], tuple[Task, dict]]


def add_fresh_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fresh", action="store_true",
                        help="start over in --out: the results of an earlier run there (other settings too) are "
                             "moved to --out/replaced-<time>/ instead of being resumed")


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")


def check_out(args: argparse.Namespace) -> None:
    """An explicit --out that is a file, lies under a file, is not writable or is the --img-path folder: an error
    before any work."""
    if args.out:
        check_output_folder(args.out)
        if getattr(args, "img_path", None):
            output_folders(args.out, args.img_path)


DEFAULT_RESULTS = Path("results")


def output_folders(out: str | Path, img_path: str | Path) -> list[Path]:
    """The folders a run's listing of ``img_path`` leaves out: ``out`` and the default results/ folder (outputs
    are never inputs). ``out`` equal to ``img_path`` is a UsageError: the outputs would mix with the images."""
    if Path(img_path).is_dir() and Path(out).resolve() == Path(img_path).resolve():
        raise UsageError(f"--out {display_path(str(out))} is the --img-path folder: outputs would be mixed with the "
                         "images; give another folder")
    return [Path(out), DEFAULT_RESULTS]


def hashed_file(path: str | Path | None) -> tuple[str | None, str | None]:
    """(content hash, resolved path) of a settings file (labels, difficult list); (None, None) without one."""
    if path is None:
        return None, None
    return file_sha256(path), str(Path(path).resolve())


def labels_identity(labels: str | None) -> dict:
    """The labels file's content hash; a devkit ground-truth file is read through the meta.mat beside it,
    whose hash is part of the identity too."""
    digest, where = hashed_file(labels)
    identity = {"labels": digest, ABOUT: {"labels": where}}
    if labels is not None and Path(labels).name.startswith("ILSVRC2012_validation_ground_truth"):
        meta = Path(labels).parent / "meta.mat"
        identity["labels_meta"] = file_sha256(meta) if meta.is_file() else None
    return identity


# The flags that are not part of a run's identity (see run_identity): they change no recorded number, so a
# study (reproduce.py) refuses to sweep them; --out and --fresh say where the results go, not what they are.
NOT_IDENTITY_FLAGS = ("batch-size", "workers", "score-batch", "patch-batch", "limit", "out", "fresh")


def run_identity(args: argparse.Namespace, setup: Setup, settings: dict, metric: str) -> dict:
    """Everything that can change a recorded number: model and method settings, the weights file's hash
    (path in 'about'), the script's settings, the metric's code version, device type, precision and --deterministic.

    Not part of it, because they change no number (only how the work is split, up to float rounding):
    --batch-size, --workers, --score-batch (how many perturbed images share one no-grad forward: each image's
    probability is computed alone, as in eval mode nothing mixes images), --patch-batch, --limit (the summary
    covers exactly the invocation's images) and torchrun's process count; these flags (with --out and --fresh)
    are NOT_IDENTITY_FLAGS."""
    settings = dict(settings)
    about = dict(settings.pop(ABOUT, {}))
    identity = {**setup.settings(), **settings}
    weights = getattr(args, "weights", None)
    if weights not in (None, "default", "random") and Path(weights).is_file():
        identity["weights"] = file_sha256(weights)
        about["weights"] = str(Path(weights).resolve())
    identity.update(metric=metric, metric_version=METRIC_VERSIONS[metric], record_format=RECORD_FORMAT,
                    device=setup.device.type, precision=setup.precision.describe(),
                    deterministic=bool(getattr(args, "deterministic", False)))
    return {**identity, ABOUT: about}


def run_evaluation(args: argparse.Namespace, default_out: Callable[[Setup], Path], make_task: MakeTask,
                   on_batch: Callable[[int], None] | None = None,
                   load_spec: Callable[[object], ModelSpec] | None = None, *, metric: str) -> int:
    """Check the output folder, build everything from the flags, lock the folder, refuse one of other
    settings (or move it aside with --fresh), run the driver."""
    check_limit(args.limit)
    check_out(args)
    info, args.device = distributed.init(args.device)
    store = None
    try:
        setup = build_setup(args, load_spec=load_spec)
        out = Path(args.out) if args.out else check_output_folder(default_out(setup))
        store = ResultStore(out, info.rank)
        store.lock()
        task, settings = make_task(setup, info)
        identity = run_identity(args, setup, settings, metric)
        base_from = getattr(args, "base_from", None)
        if base_from is not None:
            identity[ABOUT]["base_from"] = str(Path(base_from).resolve())
        problem = None
        if info.is_main:
            try:
                if getattr(args, "fresh", False):
                    aside = store.start_fresh()
                    if aside is not None:
                        print(f"--fresh: moved the earlier results of {display_path(str(out))} to "
                              f"{display_path(str(aside))}/")
                store.check_config(identity, True)
            except StoreError as exc:
                problem = str(exc)
        problem = info.from_main(problem)  # every rank stops on rank 0's refusal, none reads a stale folder
        if problem is not None:
            raise StoreError(problem)
        if base_from is not None:
            task.reuse_base(ReusedBaseRow(base_from, out, setup.method, identity, [task.key(i) for i in task.items]))
        if info.is_main:
            print(f"{len(task.items)} items, {info.world} process(es), device {setup.device}; "
                  f"results in {display_path(str(out))}/")
        run_task(task, store, info, args.batch_size, args.workers, on_batch, setup.precision.autocast,
                 pin_memory=setup.device.type == "cuda")
        if base_from is not None and info.is_main:
            print(f"--base-from: {task.reused.used} batch(es) took the {setup.method} row from "
                  f"{display_path(str(base_from))}/")
    finally:
        if store is not None:
            store.release()
        distributed.finish(info)
    return 0


def results_folder(script: str, args: argparse.Namespace) -> Callable[[Setup], Path]:
    """results/<script>/<model>_<method>[_ucag]: the default --out."""
    return lambda setup: Path("results") / script / f"{args.name}_{setup.file_label}{'_ucag' if args.ucag else ''}"


def described(setup: Setup) -> str:
    """The progress bar's label: the method, '+ UCAG' with it."""
    return f"{setup.method}{' + UCAG' if setup.ucag else ''}"


def image_metric_parser(prog: str, description: str, base_from: bool = True) -> Parser:
    """The flags of insdel.py, density.py, confidence.py, road.py and sanity.py: the common ones, the dataset
    flags and (``base_from``: the metrics of ImageMetricTask) --base-from."""
    parser = Parser(prog=prog, description=description)
    add_common_flags(parser)
    add_eval_flags(parser)
    add_fresh_flag(parser)
    if base_from:
        add_base_from_flag(parser)
    return parser


def add_base_from_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-from", default=None, metavar="FOLDER",
                        help="take the method's own row from the run in FOLDER where it has it (that run's "
                             "settings must equal this run's but for UCAG's): a sweep of UCAG's settings "
                             "computes the base row once")


def run_image_metric(args: argparse.Namespace, script: str, metric: ImageMetric, fields: Sequence[str],
                     settings: dict, write: ReportWriter, digits: int, on_batch: Callable[[int], None] | None = None,
                     official_ranking: bool = False, lists: Sequence[str] = ()) -> int:
    """insdel.py and density.py: a per-image metric over ImageNet-style data (class folders, a flat folder with
    labels, or any folder explained for the predicted class). ``settings``: the metric's own (an 'about' entry
    is recorded, not compared); ``digits``: the progress bar's running means. ``official_ranking``, ``lists``:
    see :class:`evaluation.image_metric.ImageMetricTask`."""
    settings = dict(settings)
    about = settings.pop(ABOUT, {})

    def make_task(setup: Setup, info: Dist) -> tuple[Task, dict]:
        outputs = output_folders(args.out or results_folder(script, args)(setup), args.img_path)
        # rank 0 lists the tree (and warns about it) once; every other rank receives its listing
        samples = info.on_main(lambda: discover(args.img_path, args.labels, setup.spec.num_classes,
                                                need_labels=args.target == "gt", outputs=outputs, limit=args.limit))
        target_mode = args.target or ("gt" if samples[0].label is not None else "pred")
        header = {"model": setup.spec.name, "method": setup.method, "target": target_mode, **settings}
        task = ImageMetricTask(samples, setup.spec, setup.device, setup.rows(), metric, fields, target_mode, header,
                               official_ranking, lists, report=write, digits=digits, description=described(setup))
        labels = labels_identity(args.labels)
        return task, {"target": target_mode,
                      "img_path": str(Path(args.img_path).resolve()),
                      **labels, **settings, ABOUT: {**labels[ABOUT], **about}}

    return run_evaluation(args, results_folder(script, args), make_task, on_batch, metric=script)


def run_pointing_game(args: argparse.Namespace, on_batch: Callable[[int], None] | None = None) -> int:
    """pointing_game.py: the pointing and energy games (:class:`evaluation.pointing_task.PointingGameTask`) on
    VOC07 or COCO14, rows center, the method and with --ucag the method with UCAG, with the dataset's
    multi-label model."""
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be 0 or more (got {args.tolerance})")
    check_out(args)
    dataset = open_dataset(args.dataset, args.data_root)
    flags = read_difficult_list(args.difficult_list, len(dataset.categories)) if args.difficult_list else None

    def make_task(setup: Setup, info: Dist) -> tuple[Task, dict]:
        entries = dataset.entries[:args.limit] if args.limit else dataset.entries
        task = PointingGameTask(dataset, entries, setup.rows(center=True), setup.spec, setup.device,
                                {"dataset": args.dataset, "model": args.name, "method": setup.method},
                                args.tolerance, args.aggregation, args.unlisted, flags,
                                description=f"pointing {described(setup)}")
        missing = task.unlisted_count()
        if missing:
            subset = "in 'all' and in the difficult subset" if args.unlisted == "difficult" else "in 'all' only"
            tqdm.write(f"note: {missing} image(s) are not in {args.difficult_list}; their pairs count {subset} "
                       f"(--unlisted {args.unlisted})")
        difficult_hash, difficult_path = hashed_file(args.difficult_list)
        return task, {"dataset": args.dataset, "data_root": str(Path(args.data_root).resolve()),
                      "tolerance": args.tolerance, "difficult_list": difficult_hash,
                      "aggregation": args.aggregation, "unlisted": args.unlisted,
                      ABOUT: {"difficult_list": difficult_path}}

    def default_out(setup: Setup) -> Path:
        return Path(f"results/pointing/{args.dataset}_{args.name}_{setup.file_label}{'_ucag' if args.ucag else ''}")

    return run_evaluation(args, default_out, make_task, on_batch, load_spec=lambda device: load_multilabel(
        args.name, dataset.categories, args.weights, device, args.target_layer), metric="pointing_game")


def run_segmentation(args: argparse.Namespace, on_batch: Callable[[int], None] | None = None) -> int:
    """segmentation.py: ImageNet segmentation (:class:`evaluation.segmentation_task.SegmentationTask`) of the
    gtsegs_ijcv.mat file, rows the method and with --ucag the method with UCAG."""
    check_out(args)
    dataset = ImageNetSegmentation(args.data)

    def make_task(setup: Setup, info: Dist) -> tuple[Task, dict]:
        keys = dataset.keys()[:args.limit] if args.limit else dataset.keys()
        task = SegmentationTask(dataset, keys, setup.rows(), setup.spec, setup.device,
                                {"model": args.name, "method": setup.method}, args.ap,
                                description=f"segmentation {setup.method}")
        # the .mat file's content hash: a file replaced under the same path is not resumed into the old records
        return task, {"data": str(Path(args.data).resolve()), "data_hash": file_sha256(args.data), "ap": args.ap}

    return run_evaluation(args, results_folder("segmentation", args), make_task, on_batch, metric="segmentation")


def run_sanity(args: argparse.Namespace, on_batch: Callable[[int], None] | None = None) -> int:
    """sanity.py: model-parameter randomisation (cascading, independent) or the random-logit test
    (:class:`evaluation.sanity_task.SanityTask`) over ImageNet-style data, layouts and labels as insdel.py; the
    mode, the weights' seed and the randomised layers' names are part of the run's identity."""
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1 (got {args.max_steps})")
    if args.max_steps is not None and args.mode == "logit":
        raise UsageError("--max-steps has no effect with --mode logit (one step, the model unchanged)")
    if args.weights_seed < 0:
        raise UsageError(f"--weights-seed must be 0 or more (got {args.weights_seed})")

    def make_task(setup: Setup, info: Dist) -> tuple[Task, dict]:
        outputs = output_folders(args.out or results_folder("sanity", args)(setup), args.img_path)
        samples = info.on_main(lambda: discover(args.img_path, args.labels, setup.spec.num_classes,
                                                need_labels=args.target == "gt", outputs=outputs, limit=args.limit))
        target_mode = args.target or ("gt" if samples[0].label is not None else "pred")
        header = {"model": setup.spec.name, "method": setup.method, "target": target_mode, "mode": args.mode,
                  "weights_seed": args.weights_seed}
        task = SanityTask(samples, setup.spec, setup.device, setup.rows(), args.mode, args.weights_seed,
                          target_mode, args.max_steps, header, report=write_sanity_report,
                          description=f"sanity {args.mode} {described(setup)}")
        labels = labels_identity(args.labels)
        return task, {"target": target_mode, "img_path": str(Path(args.img_path).resolve()), **labels,
                      "mode": args.mode, "weights_seed": args.weights_seed,
                      "layers": task.labels if args.mode != "logit" else [], ABOUT: labels[ABOUT]}

    return run_evaluation(args, results_folder("sanity", args), make_task, on_batch, metric="sanity")
