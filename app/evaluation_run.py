"""What insdel.py and density.py share: data, resume, sharding, merging and writing the outputs."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from app.cli import UsageError, build_setup
from evaluation import distributed
from evaluation.datasets import discover
from evaluation.runner import Metric, evaluate, row_means, table_rows
from evaluation.store import ResultStore


def ucag_settings(args: argparse.Namespace, setup) -> dict:
    """The UCAG geometry a run's results depend on (recorded in run.json; empty without --ucag)."""
    if setup.ucag is None:
        return {}
    return {"alpha": args.alpha, "crop": args.crop_size, "n": args.num_patches,
            "confidence": setup.ucag.confidence, "official": setup.ucag.official}


def default_out(args: argparse.Namespace, script: str, method: str) -> Path:
    return Path("results") / script / f"{args.name}_{method}{'_ucag' if args.ucag else ''}"


def run_evaluation(args: argparse.Namespace, script: str, metric: Metric, fields: Sequence[str], extra_config: dict,
                   running: Callable[[list[dict]], str], write_outputs: Callable[..., None],
                   on_batch: Callable[[int], None] | None = None) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {args.limit})")
    info, args.device = distributed.init(args.device)
    try:
        setup = build_setup(args)
        samples = discover(args.img_path, args.labels, setup.spec.num_classes, need_labels=args.target == "gt")
        target_mode = args.target or ("gt" if samples[0].label is not None else "pred")
        samples = samples[:args.limit] if args.limit else samples
        out = Path(args.out) if args.out else default_out(args, script, setup.method)
        store = ResultStore(out, info.rank)
        config = {"model": setup.spec.name, "weights": setup.spec.weights, "layer": setup.spec.target_layer,
                  "method": setup.method, "ucag": setup.ucag is not None, "target": target_mode,
                  "img_path": str(Path(args.img_path).resolve()), **extra_config, **ucag_settings(args, setup)}
        store.check_config(config, info.is_main)
        if info.is_main:
            print(f"{len(samples)} images, {info.world} process(es), device {setup.device}; results in {out}/")
        evaluate(samples, setup, store, info, metric, target_mode, args.batch_size, args.workers, args.alpha,
                 desc=f"{setup.method}{' + UCAG' if setup.ucag else ''}", running=running, on_batch=on_batch)
        info.barrier()
        if info.is_main:
            results, skipped = store.merged()
            rows = table_rows(setup)
            if not results:
                raise UsageError(f"no image could be evaluated ({len(skipped)} skipped, see {out}/skipped.txt)")
            summary = {"model": setup.spec.name, "method": setup.method, "n_images": len(results),
                       "target": target_mode, **extra_config, "rows": row_means(results, rows, fields)}
            write_outputs(out, results, skipped, rows, summary)
    finally:
        distributed.finish(info)
    return 0
