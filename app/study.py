"""A study file (reproduce.py): one script, its flags, a sweep of some of them; read and checked whole before
any work, every mistake a one-line error naming the file, the key and its line.

    name = "Image scale factor"
    script = "insdel"          # a name of the caller's script table (reproduce.SCRIPTS)
    [args]                     # flags without dashes, as on the command line: every point gets them
    method = "gradcam"         # the positional
    ucag = true                # a switch given (false: left out)
    img-path = "examples"
    [sweep]                    # the cartesian product of these lists, one point each
    alpha = [1, 2, 3]
    name = ["resnet50", "densenet121"]
    [plot]                     # optional: each main field against x, one line per series value and row
    x = "alpha"
    series = "name"
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from app.evaluation_run import NOT_IDENTITY_FLAGS
from app.flags import UsageError
from common.images import display_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Script:
    """A script a study can run (an entry of reproduce.SCRIPTS): its module (``build_parser``, ``main(argv,
    on_batch)``, ``PROG``), the fields of its summary rows that study.md and the plots show (None: every number
    of a row) and the digits they are shown with. The module is imported by name when a study names it."""

    module: str
    fields: tuple[str, ...] | None = None
    digits: int = 3

    def load(self):
        return importlib.import_module(self.module)


TOP_LEVEL = ("name", "script", "args", "sweep", "plot")
PLOT_KEYS = ("x", "series")
# a point's folder: these characters kept, every other one replaced by '_'
_SAFE = re.compile(r"[^A-Za-z0-9.,+=-]")
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_\-.]+)\s*=""")


def key_lines(text: str) -> dict[tuple[str | None, str | None], int]:
    """Line (1-based) of each key of the file, by a scan of its text: (table, key) -> line; (table, None) is
    the table's header; top-level keys have table None. Dotted keys (args.alpha = 1) count under their
    table."""
    lines: dict[tuple[str | None, str | None], int] = {}
    table = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = header.group(1).strip().strip("\"'")
            lines.setdefault((table, None), number)
            continue
        key = _KEY.match(line)
        if key:
            name = key.group(1)
            if name[0] in "\"'":
                name = name[1:-1]
            where = table
            if "." in name and key.group(1)[0] not in "\"'":
                first, name = name.split(".", 1)
                where = first if table is None else f"{table}.{first}"
            lines.setdefault((where, name), number)
    return lines


@dataclass
class Point:
    """One run of a study: its folder name, its swept values, the script's argv without --out."""

    name: str
    sweep: dict
    argv: list[str]
    args: argparse.Namespace = field(repr=False, default=None)


@dataclass
class Study:
    path: Path
    name: str
    script: str
    args: dict
    sweep: dict
    plot: dict | None
    points: list[Point]
    entry: Script


class StudyReader:
    """Reads and checks one study file; :meth:`error` words a mistake with the file, the key and its line."""

    def __init__(self, path: str | Path, scripts: dict[str, Script]):
        self.path, self.scripts = Path(path), scripts
        self.shown = display_path(str(path))
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"{self.shown}: no such study file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{self.shown}: cannot read the study file ({getattr(exc, 'strerror', None) or exc})") \
                from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{self.shown}: not a TOML file: {str(exc).splitlines()[0]}") from None
        self.lines = key_lines(self.text)

    def error(self, table: str | None, key: str | None, problem: str) -> UsageError:
        line = self.lines.get((table, key)) or self.lines.get((table, None))
        where = f"{self.shown}:{line}" if line else self.shown
        if key is None:
            return UsageError(f"{where}: [{table}]: {problem}")
        named = key if table is None else f"[{table}] {key}"
        return UsageError(f"{where}: {named}: {problem}")

    def read(self) -> Study:
        data = self.data
        for key in data:
            if key not in TOP_LEVEL:
                if (key, None) in self.lines and (None, key) not in self.lines:
                    raise self.error(key, None, f"unknown table (a study file has {', '.join(TOP_LEVEL)})")
                raise self.error(None, key, f"unknown key (a study file has {', '.join(TOP_LEVEL)})")
        name = data.get("name", self.path.stem)
        if not isinstance(name, str) or not name.strip():
            raise self.error(None, "name", "must be a non-empty string")
        script = data.get("script")
        known = ", ".join(self.scripts)
        if script is None:
            raise UsageError(f"{self.shown}: no 'script' key (one of {known})")
        if not isinstance(script, str) or script not in self.scripts:
            raise self.error(None, "script", f"unknown script {script!r} (one of {known})")
        args, sweep, plot = (self.table(key) for key in ("args", "sweep", "plot"))
        parser = self.scripts[script].load().build_parser()
        actions = self.flag_actions(parser)
        for table, values in (("args", args), ("sweep", sweep)):
            for key in values:
                self.check_key(table, key, actions)
        for key in sweep:
            if key in args:
                raise self.error("sweep", key, "is in [args] too: give it in one of them")
            if key in NOT_IDENTITY_FLAGS:
                raise self.error("sweep", key, "is not part of a run's identity (it changes no number): give it "
                                               "in [args]")
            values = sweep[key]
            if not isinstance(values, list):
                raise self.error("sweep", key, "must be a list of values, e.g. [1, 2]")
            if not values:
                raise self.error("sweep", key, "is an empty list: give at least one value")
        for key, value in args.items():
            self.flag_argv("args", key, value, actions[key])
        for key, values in sweep.items():
            for value in values:
                self.flag_argv("sweep", key, value, actions[key])
        plot = self.check_plot(plot, sweep)
        points = self.points(parser, args, sweep, actions)
        return Study(self.path, name, script, args, sweep, plot, points, self.scripts[script])

    def table(self, key: str) -> dict:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(None, key, f"must be a table ([{key}])")
        return value

    @staticmethod
    def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
        """Study key -> the parser's action: 'method' (the positional), 'x' for -x, 'name' for --name."""
        actions = {}
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:
                actions[action.dest] = action
            for option in action.option_strings:
                actions[option.lstrip("-")] = action
        return actions

    def check_key(self, table: str, key: str, actions: dict) -> None:
        if key == "out":
            raise self.error(table, key, "reproduce.py owns the points' folders: give the study's folder as "
                                         "reproduce.py --out DIR")
        if key == "fresh":
            raise self.error(table, key, "would start every point over on each rerun: move a point's folder "
                                         "aside by hand instead")
        if key not in actions:
            raise self.error(table, key, f"{self.data['script']}.py has no flag --{key}")

    def flag_argv(self, table: str, key: str, value, action: argparse.Action) -> list[str]:
        """The command-line words of one key's value (true: the switch; false: nothing; a list: an nargs
        flag's values); a value of the wrong kind is an error."""
        positional = not action.option_strings
        flag = [] if positional else ["-" + key if len(key) == 1 else "--" + key]
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch:
            if not isinstance(value, bool):
                raise self.error(table, key, f"is a switch: true or false (got {value!r})")
            return flag if value else []
        if isinstance(value, bool):
            raise self.error(table, key, f"takes a value, not {str(value).lower()}")
        many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
        if isinstance(value, list):
            if not many:
                raise self.error(table, key, f"takes one value, not a list (got {value!r})")
            if not value and action.nargs == "+":
                raise self.error(table, key, "takes at least one value")
            words = [self.word(table, key, item) for item in value]
        elif isinstance(value, (str, int, float)):
            words = [self.word(table, key, value)]
        else:
            raise self.error(table, key, f"must be a string, a number{', a list' if many else ''} "
                                         f"(got {type(value).__name__})")
        return flag + words

    def word(self, table: str, key: str, value) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(table, key, f"must hold strings or numbers (got {value!r})")
        return value if isinstance(value, str) else repr(value)

    def check_plot(self, plot: dict, sweep: dict) -> dict | None:
        if not plot and "plot" not in self.data:
            return None
        for key in plot:
            if key not in PLOT_KEYS:
                raise self.error("plot", key, f"unknown key ([plot] has {', '.join(PLOT_KEYS)})")
        if "x" not in plot:
            raise self.error("plot", None, "needs x, the swept flag on the horizontal axis")
        for key in plot:
            value = plot[key]
            if not isinstance(value, str) or value not in sweep:
                swept = ", ".join(sweep) or "none"
                raise self.error("plot", key, f"{value!r} is not a swept flag (swept: {swept})")
        if plot.get("series") == plot["x"]:
            raise self.error("plot", "series", "is x too: give another swept flag or leave it out")
        return dict(plot)

    def points(self, parser, args: dict, sweep: dict, actions: dict) -> list[Point]:
        """The cartesian product of the sweep, each point's argv parsed by the script's own parser (its refusal
        named with the key, before any work)."""
        points, names = [], {}
        keys = list(sweep)
        for values in itertools.product(*(sweep[key] for key in keys)):
            chosen = dict(zip(keys, values, strict=True))
            merged = {**args, **chosen}
            words = []
            for key, value in merged.items():
                table = "sweep" if key in chosen else "args"
                words.append(self.flag_argv(table, key, value, actions[key]))
            pairs = list(zip(merged, words, strict=True))
            positional = [w for key, w in pairs if not actions[key].option_strings]
            flags = [w for key, w in pairs if actions[key].option_strings]
            argv = [*itertools.chain(*positional), *itertools.chain(*flags)]
            name = point_name(chosen)
            if name in names:
                key = next((k for k in keys if names[name][k] != chosen[k]), None)
                if key is None:
                    twice = next(k for k in keys if len(set(map(repr, sweep[k]))) < len(sweep[k]))
                    raise self.error("sweep", twice, "holds a value twice: give each value once")
                raise self.error("sweep", key, f"the values {names[name][key]!r} and {chosen[key]!r} share the "
                                               f"folder {name!r}: give values that differ in their letters and digits")
            names[name] = chosen
            points.append(Point(name, chosen, argv, self.parse(parser, argv, merged, chosen, actions)))
        return points

    def parse(self, parser, argv: list[str], merged: dict, chosen: dict, actions: dict) -> argparse.Namespace:
        problems = []

        def refuse(message: str):
            problems.append(message)
            raise _Refused

        parser.error = refuse
        try:
            return parser.parse_args(argv)
        except _Refused:  # argparse's message, in problems, is mapped back to the key that gave it
            message = problems[0]
        for key in merged:
            action = actions[key]
            label = "/".join(action.option_strings) or action.metavar or action.dest
            if message.startswith(f"argument {label}:"):
                table = "sweep" if key in chosen else "args"
                raise self.error(table, key, message)
        raise self.error("args", None, message)


class _Refused(Exception):
    """The script's parser refused a point's argv (its message kept by StudyReader.parse)."""


def point_name(chosen: dict) -> str:
    """The folder of a point: its swept values as key=value joined by '_', filesystem-safe ('alpha=2_name=resnet50');
    a name too long for a folder keeps its start and a hash of the whole. No sweep: 'run'."""
    if not chosen:
        return "run"
    parts = []
    for key, value in chosen.items():
        if isinstance(value, list):
            text = ",".join(_text(v) for v in value)
        else:
            text = _text(value)
        parts.append(f"{key}={text}")
    name = _SAFE.sub("_", "_".join(parts))
    if len(name) > 150:
        name = f"{name[:130]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)


def read_study(path: str | Path, scripts: dict[str, Script]) -> Study:
    """The study file at ``path``, checked whole; ``scripts``: the scripts it may name (reproduce.SCRIPTS)."""
    return StudyReader(path, scripts).read()


def count_images(args: argparse.Namespace, out: Path) -> int:
    """The number of images a point evaluates (before skips), from its parsed flags: an image folder
    (--img-path), a localization dataset (--dataset, --data-root) or the segmentation file (--data); the data
    missing or unreadable is a ToolkitError."""
    if getattr(args, "img_path", None) is not None:
        from app.evaluation_run import DEFAULT_RESULTS
        from common.images import find_image_names
        if not Path(args.img_path).exists():
            raise UsageError(f"--img-path {display_path(args.img_path)} does not exist")
        count = len(find_image_names(args.img_path, [out, DEFAULT_RESULTS]))
    elif getattr(args, "data_root", None) is not None:
        from evaluation.localization_data import open_dataset
        count = len(open_dataset(args.dataset, args.data_root).entries)
    elif getattr(args, "data", None) is not None:
        from evaluation.imagenet_seg import ImageNetSegmentation
        count = len(ImageNetSegmentation(args.data).keys())
    else:
        raise UsageError("no data flag (--img-path, --data-root or --data) to count the images of")
    limit = getattr(args, "limit", None)
    return min(count, limit) if limit else count


def point_state(out: Path, images: int | None) -> str:
    """'done' (summary.json written and every image recorded), 'partial k/N' (records of k images), or
    'new', read from the point's folder without touching it."""
    parts = sorted((out / "parts").glob("part-*.jsonl")) if (out / "parts").is_dir() else []
    keys = set()
    for part in parts:
        with open(part, "rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    keys.add(json.loads(line)["key"])
                except (ValueError, KeyError, TypeError):
                    continue
    if (out / "summary.json").is_file() and (images is None or len(keys) >= images):
        return "done"
    if keys:
        return f"partial {len(keys)}/{images if images is not None else '?'}"
    return "new"

