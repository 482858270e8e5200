"""The sanity checks of saliency maps as one :class:`SanityTask` of the evaluation driver: model-parameter
randomisation (Adebayo et al. 2018, cascading or independent) and the random-logit test (Sixt et al. 2020).

Per batch: every row's original maps (the method, and ``method*`` with UCAG) for the explained classes; then,
step after step, the model randomised as the step wants (:mod:`evaluation.randomisation`), every row explained
again for the same classes and compared with its original maps (:mod:`evaluation.similarity`); the original
weights are back at the end of the batch, also after an error or Ctrl-C. The random-logit test has one step: the
map of a random other class (drawn per image from a generator seeded by the run's seed and the image's key,
uniform over the classes other than the target) against the target's map, the model unchanged. A record holds,
per row, the per-step lists ``spearman``, ``spearman_abs``, ``ssim`` and ``hog``; each image is compared alone,
so the numbers do not depend on the batch size (up to float rounding of the batched explanations).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.images import display_path
from evaluation.datasets import Sample
from evaluation.image_metric import load_sample
from evaluation.randomisation import RandomWeights, denormals_flushed, parameter_layers, randomised, set_step
from evaluation.rows import Row, batch_targets, explain_rows
from evaluation.sanity_report import verdict_step
from evaluation.similarity import FIELDS, Reference, compare, input_maps
from evaluation.task import RunningText, Task
from models import ModelSpec, preprocess

LOGIT_LABEL = "random logit"


def random_class(key: str, target: int, num_classes: int, seed: int) -> int:
    """The random-logit test's other class for one image: uniform over the classes other than ``target``, from
    a generator seeded by ``seed`` and the image's key (the same class whatever the batch or process)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()
    draw = int(np.random.default_rng(int.from_bytes(digest[:8], "little")).integers(0, num_classes - 1))
    return draw + (draw >= target)


class LastStepMeans(RunningText):
    """The progress bar: each row's running mean Spearman after the last step, e.g. 'gradcam rho 0.12'."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, records: Iterable[dict]) -> None:
        for record in records:
            for name, scores in record["rows"].items():
                total = self.sums.setdefault(name, [0.0, 0])
                value = scores["spearman"][-1] if scores["spearman"] else math.nan
                if not math.isnan(value):
                    total[0] += value
                    total[1] += 1

    def text(self) -> str:
        return ", ".join(f"{name} rho {total[0] / total[1]:.3f}" for name, total in self.sums.items() if total[1])


def step_statistics(records: Iterable[dict], rows: Sequence[Row], count: int) -> list[list[dict]]:
    """Per row, per step: the mean and standard deviation (over images, NaN left out) of every similarity,
    with the number of images that have a finite value, in one pass."""
    sums = np.zeros((len(rows), count, len(FIELDS)))
    squares = np.zeros_like(sums)
    finite = np.zeros(sums.shape, dtype=np.int64)
    for record in records:
        for i, row in enumerate(rows):
            scores = record["rows"][row.name]
            values = np.array([scores[name] for name in FIELDS], dtype=float).T  # (steps, fields)
            ok = np.isfinite(values)
            clean = np.where(ok, values, 0.0)
            sums[i] += clean
            squares[i] += clean * clean
            finite[i] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / finite
        spread = np.sqrt(np.maximum(squares / finite - means * means, 0.0))
    return [[{**{name: float(means[i, k, j]) for j, name in enumerate(FIELDS)},
              **{f"{name}_std": float(spread[i, k, j]) for j, name in enumerate(FIELDS)},
              "n": int(finite[i, k, 0])} for k in range(count)] for i in range(len(rows))]


@dataclass
class SanityTask(Task):
    """Model-parameter randomisation (``mode`` 'cascading' or 'independent') or the random-logit test
    ('logit') over ImageNet-style samples, every row of ``rows`` compared with its own original maps.
    ``weights_seed``: the random weights' (and the random classes') seed; ``max_steps``: randomise only the
    top N layers; ``report``: writes the report files (:mod:`evaluation.sanity_report`)."""

    samples: Sequence[Sample]
    spec: ModelSpec
    device: torch.device
    rows: Sequence[Row]
    mode: str
    weights_seed: int
    target_mode: str
    max_steps: int | None = None
    header: dict = field(default_factory=dict)
    report: object = field(default=None, kw_only=True)
    description: str = field(default="sanity", kw_only=True)
    layers: list = field(init=False, repr=False)
    weights: RandomWeights = field(init=False, repr=False)

    def __post_init__(self):
        every = parameter_layers(self.spec.model)
        self.layers = every if self.max_steps is None else every[:self.max_steps]
        self.weights = RandomWeights(self.layers, self.weights_seed)

    @property
    def labels(self) -> list[str]:
        """The steps' labels: the randomised layer of each step, or 'random logit'."""
        return [LOGIT_LABEL] if self.mode == "logit" else [name or "(model)" for name, _ in self.layers]

    @property
    def items(self) -> Sequence[Sample]:
        return self.samples

    def key(self, item: Sample) -> str:
        return item.key

    def load(self, item: Sample) -> dict:
        return load_sample(item)

    def running(self) -> RunningText:
        return LastStepMeans()

    def shape(self) -> dict:
        return {"rows": [row.name for row in self.rows], "lists": FIELDS, "keys": ("file", "target")}

    def images(self, batch: list[dict]) -> torch.Tensor:
        return preprocess([r["image"] if r.get("pixels") is None else r["pixels"] for r in batch], self.spec,
                          self.device)

    def targets(self, batch: list[dict], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = (torch.tensor([r["sample"].label for r in batch], device=x.device)
                  if self.target_mode == "gt" else None)
        return batch_targets(self.spec.model, x, labels)

    def originals(self, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None) -> dict:
        """{row name: the original maps at the input size} of the batch."""
        size = tuple(x.shape[-2:])
        return {row.name: input_maps(explanation.maps, size)
                for row, explanation, _ in explain_rows(self.rows, x, targets, logits)}

    def step_maps(self, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None,
                  others: torch.Tensor | None, visit, wanted: Collection[int] | None = None) -> None:
        """Call ``visit(step, {row name: maps at the input size})`` for every step (``wanted``: only those):
        inside the randomisation (the original weights restored afterwards, also after an error; denormal
        floats flushed to zero meanwhile, see :func:`evaluation.randomisation.denormals_flushed`), or once for
        the random classes ``others``."""
        size = tuple(x.shape[-2:])
        if self.mode == "logit":
            visit(0, {row.name: input_maps(explanation.maps, size)
                      for row, explanation, _ in explain_rows(self.rows, x, others, logits)})
            return
        with randomised(self.layers) as snapshot, denormals_flushed():
            for index in range(len(self.layers)):
                set_step(self.weights, snapshot, self.mode, index)
                if wanted is None or index in wanted:
                    # the randomised model's logits differ: no precomputed logits are handed to the rows
                    visit(index, {row.name: input_maps(explanation.maps, size)
                                  for row, explanation, _ in explain_rows(self.rows, x, targets)})

    def figure_maps(self, record: dict, wanted: Sequence[int]) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
        """The image of ``record`` (H, W, 3 in [0, 1]) and, per row, its [0, 1] (min-max) maps: the original,
        then after each step of ``wanted``, the model restored afterwards (sanity_maps.png)."""
        from methods.postprocess import min_max
        sample = next(s for s in self.samples if s.key == record["key"])
        loaded = load_sample(sample)
        x = self.images([loaded])
        targets = torch.tensor([record["target"]], device=x.device)
        others = torch.tensor([record["random_class"]], device=x.device) if self.mode == "logit" else None
        columns = {row.name: [min_max(m)[0, 0].cpu().numpy()] for row, m in
                   zip(self.rows, self.originals(x, targets, None).values(), strict=True)}

        def visit(step: int, maps: dict) -> None:
            for name, values in maps.items():
                columns[name].append(min_max(values)[0, 0].cpu().numpy())

        self.step_maps(x, targets, None, others, visit, set(wanted))
        mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        std = torch.tensor(self.spec.std).view(3, 1, 1)
        image = (x[0].cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        return image, columns

    def other_classes(self, batch: list[dict], targets: torch.Tensor) -> torch.Tensor:
        classes = [random_class(r["key"], int(t), self.spec.num_classes, self.weights_seed)
                   for r, t in zip(batch, targets.tolist(), strict=True)]
        return torch.tensor(classes, device=targets.device)

    def process(self, batch: list[dict]) -> list[dict]:
        x = self.images(batch)
        targets, logits = self.targets(batch, x)
        # every row's maps are compared in one call (one sort of all of them, which runs rows in parallel)
        reference = Reference.of(torch.cat(list(self.originals(x, targets, logits).values())))
        others = self.other_classes(batch, targets) if self.mode == "logit" else None
        scores = {row.name: {name: [] for name in FIELDS} for row in self.rows}

        def visit(step: int, maps: dict) -> None:
            for field_name, value in compare(reference, torch.cat([maps[row.name] for row in self.rows])).items():
                for row, part in zip(self.rows, value.split(len(batch)), strict=True):
                    scores[row.name][field_name].append(part)

        self.step_maps(x, targets, logits, others, visit)
        # (steps, B) per field -> each image's per-step lists
        host = {name: {f: torch.stack(v, dim=1).tolist() for f, v in fields.items()} for name, fields in scores.items()}
        classes = targets.tolist()
        records = []
        for i, r in enumerate(batch):
            record = {"key": r["key"], "file": display_path(r["sample"].path), "target": classes[i],
                      "rows": {name: {f: values[i] for f, values in fields.items()} for name, fields in host.items()}}
            if others is not None:
                record["random_class"] = int(others[i])
            records.append(record)
        return records

    def summarize(self, records: Collection[dict]) -> dict:
        statistics = step_statistics(records, self.rows, len(self.labels))
        rows = [{"name": row.name, "ucag": row.ucag,
                 "steps": [{"layer": label, **values} for label, values in zip(self.labels, steps, strict=True)]}
                for row, steps in zip(self.rows, statistics, strict=True)]
        for row in rows:  # the similarities the verdict reads, as the row's own numbers (study tables, plots)
            decisive = verdict_step(row, self.mode)
            row.update({name: decisive[name] for name in FIELDS}, verdict_layer=decisive["layer"])
        return {**self.header, "n_images": len(records), "layers": self.labels, "rows": rows}

    def write(self, out: Path, records: Collection[dict], skipped: list[dict], summary: dict) -> None:
        self.report(self, out, records, skipped, summary)
