"""reproduce.py (issue 24): a study file's points are the runs made by hand, a stopped study resumes to the same
results, every mistake in the file is a one-line error naming file, key and line before any work, --dry-run
runs nothing."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch.distributed as torch_dist

import confidence
import reproduce
from app.evaluation_run import NOT_IDENTITY_FLAGS, run_identity
from app.study import key_lines, point_name
from app.study import read_study as read_with
from evaluation import distributed
from evaluation.study_report import write_study_report
from reproduce import SCRIPTS
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import run
from tests.test_resume import one_line_error

# FAST's flags (tests.test_eval_scripts) as study keys: tiny UCAG on the CPU, one decoding process
ARGS = f"""ucag = true
n = 2
a = 1.0
c = 180
workers = 0
device = "cpu"
img-path = "{EXAMPLES.as_posix()}"
limit = 2
batch-size = 1
"""
STUDY = f"""name = "Two methods"
script = "confidence"

[args]
{ARGS}
[sweep]
method = ["gradcam", "layercam"]

[plot]
x = "method"
"""
HAND = ["--ucag", "-n", "2", "-a", "1.0", "-c", "180", "--workers", "0", "--device", "cpu",
        "--img-path", str(EXAMPLES), "--limit", "2", "--batch-size", "1"]


def read_study(path):
    return read_with(path, SCRIPTS)


def study_file(tmp_path, text=STUDY, name="two.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The two-point study run once, uninterrupted: (study file, its folder)."""
    root = tmp_path_factory.mktemp("study")
    path = study_file(root)
    with pytest.raises(SystemExit) as stop:
        reproduce.run_cli(reproduce.main, [str(path), "--out", str(root / "out")], prog=reproduce.PROG)
    assert stop.value.code == 0
    return path, root / "out"


def test_a_study_equals_the_runs_made_by_hand(finished, tmp_path, capsys):
    _, out = finished
    record = json.loads((out / "study.json").read_text())
    assert record["name"] == "Two methods" and record["script"] == "confidence"
    assert [p["point"] for p in record["points"]] == ["method=gradcam", "method=layercam"]
    for point, method in zip(record["points"], ["gradcam", "layercam"], strict=True):
        assert point["sweep"] == {"method": method}
        assert point["argv"][0] == method and point["argv"][-2:] == ["--out", str(out / point["point"])]
        hand = tmp_path / method
        code, _, err = run(confidence, [method, *HAND, "--out", str(hand)], capsys)
        assert code == 0, err
        assert summary(out / point["point"]) == summary(hand) == point["summary"]
        assert json.loads((out / point["point"] / "run.json").read_text())["method"] == method
    table = (out / "study.md").read_text()
    assert "| method | row | images | drop | increase | change |" in table
    for name in ("gradcam", "gradcam*", "layercam", "layercam*"):
        row = next(r for p in record["points"] for r in p["summary"]["rows"] if r["name"] == name)
        assert f"| {name} | 2 | {row['drop']:.4f} |" in table
    assert all((out / f"plot_{field}.png").stat().st_size > 5000 for field in ("drop", "increase", "change"))


def test_a_stopped_study_resumes_to_the_same_results(finished, tmp_path, capsys):
    path, clean = finished
    out = tmp_path / "out"

    def stop_in_the_second_point(point, number):
        if point == "method=layercam" and number == 0:
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        reproduce.run_cli(lambda a: reproduce.main(a, on_batch=stop_in_the_second_point),
                          [str(path), "--out", str(out)], prog=reproduce.PROG)
    assert stop.value.code == 130
    assert not (out / "study.json").exists() and not (out / "method=layercam" / "summary.json").exists()
    assert len((out / "method=layercam" / "parts" / "part-0.jsonl").read_text().splitlines()) == 1
    code, stdout, _ = run(reproduce, [str(path), "--out", str(out), "--dry-run"], capsys)
    assert code == 0 and "method=gradcam: 2 image(s), done" in stdout
    assert "method=layercam: 2 image(s), partial 1/2" in stdout
    code, _, err = run(reproduce, [str(path), "--out", str(out)], capsys)
    assert code == 0, err
    for point in ("method=gradcam", "method=layercam"):
        assert summary(out / point) == summary(clean / point)
    again, first = (json.loads((folder / "study.json").read_text()) for folder in (out, clean))
    assert [p["summary"] for p in again["points"]] == [p["summary"] for p in first["points"]]


def test_dry_run_lists_the_points_and_runs_nothing(finished, tmp_path, capsys):
    path, out = finished
    fresh = tmp_path / "never"
    code, stdout, err = run(reproduce, [str(path), "--out", str(fresh), "--dry-run"], capsys)
    assert code == 0, err
    assert not fresh.exists()
    lines = stdout.splitlines()
    assert lines[0].startswith("study 'Two methods': confidence.py, 2 point(s)")
    assert "  method=gradcam: 2 image(s), new" in lines and "  method=layercam: 2 image(s), new" in lines
    assert f"    confidence.py gradcam --ucag -n 2 -a 1.0 -c 180 --workers 0 --device cpu --img-path " \
           f"{EXAMPLES.as_posix()} --limit 2 --batch-size 1 --out {fresh / 'method=gradcam'}" in lines
    assert lines[-1] == "4 image(s) over all points"
    code, stdout, _ = run(reproduce, [str(path), "--out", str(out), "--dry-run"], capsys)
    assert "method=gradcam: 2 image(s), done" in stdout and "method=layercam: 2 image(s), done" in stdout
    missing = study_file(tmp_path, STUDY.replace(EXAMPLES.as_posix(), (tmp_path / "nowhere").as_posix()), "gone.toml")
    code, stdout, _ = run(reproduce, [str(missing), "--dry-run", "--out", str(fresh)], capsys)
    assert code == 0 and "data missing: --img-path" in stdout and not fresh.exists()


def test_the_default_folder_is_results_studies_stem(tmp_path, capsys):
    path = study_file(tmp_path, name="my_study.toml")
    code, stdout, _ = run(reproduce, [str(path), "--dry-run"], capsys)
    assert code == 0 and "folder results/studies/my_study/" in stdout.splitlines()[0]


def _line(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


MISTAKES = [
    # (how the file is changed, the line holding the mistake, what the error says)
    (lambda t: t.replace("limit = 2", "limit = 2\nbogus = 1"), "bogus = 1",
     "[args] bogus: confidence.py has no flag --bogus"),
    (lambda t: t.replace("a = 1.0", 'a = "big"'), 'a = "big"',
     "[args] a: argument -a/--alpha: invalid float value: 'big'"),
    (lambda t: t.replace('method = ["gradcam", "layercam"]', 'method = ["gradcam"]\ntarget = ["gt", "nope"]'),
     "target = ", "[sweep] target: argument --target: invalid choice: 'nope'"),
    (lambda t: t.replace("n = 2\n", "").replace('method = ["gradcam", "layercam"]',
                                                'method = ["gradcam"]\nn = [2, 2.5]'),
     "n = [2, 2.5]",
     "[sweep] n: argument -n/--num-patches: invalid int value: '2.5'"),
    (lambda t: t.replace("batch-size = 1\n", "").replace('method = ["gradcam", "layercam"]',
                                                        'method = ["gradcam"]\nbatch-size = [1, 2]'),
     "batch-size = [1, 2]", "[sweep] batch-size: is not part of a run's identity"),
    (lambda t: t.replace("limit = 2", 'limit = 2\nout = "elsewhere"'), 'out = "elsewhere"',
     "[args] out: reproduce.py owns the points' folders"),
    (lambda t: "seed = 3\n" + t, "seed = 3", "seed: unknown key (a study file has name, script, args, sweep, plot)"),
    (lambda t: t + "\n[extra]\nx = 1\n", "[extra]", "[extra]: unknown table"),
    (lambda t: t.replace('method = ["gradcam", "layercam"]', 'method = ["gradcam"]\ninput-scale = []'),
     "input-scale = []", "[sweep] input-scale: is an empty list"),
    (lambda t: t.replace('x = "method"', 'x = "alpha"'), 'x = "alpha"',
     "[plot] x: 'alpha' is not a swept flag (swept: method)"),
    (lambda t: t.replace("ucag = true", 'ucag = "yes"'), 'ucag = "yes"', "[args] ucag: is a switch: true or false"),
    (lambda t: t.replace("a = 1.0", "a = [1.0, 2.0]"), "a = [1.0, 2.0]", "[args] a: takes one value, not a list"),
    (lambda t: t.replace("a = 1.0", "a = true"), "a = true", "[args] a: takes a value, not true"),
    (lambda t: t.replace('script = "confidence"', 'script = "table9"'), 'script = "table9"',
     "script: unknown script 'table9'"),
    (lambda t: t.replace('method = ["gradcam", "layercam"]', 'method = ["gradcam", "gradcam"]'),
     'method = ["gradcam", "gradcam"]', "[sweep] method: holds a value twice"),
    (lambda t: t.replace('method = ["gradcam", "layercam"]', 'method = "gradcam"'), 'method = "gradcam"',
     "[sweep] method: must be a list of values"),
    (lambda t: t.replace("ucag = true", "ucag = true\nmethod = \"gradcam\""), 'method = ["gradcam", "layercam"]',
     "[sweep] method: is in [args] too"),
]


@pytest.mark.parametrize(("change", "needle", "message"), MISTAKES, ids=[m[2].split(":")[0] for m in MISTAKES])
def test_each_mistake_is_one_line_naming_file_key_and_line(change, needle, message, tmp_path, capsys):
    text = change(STUDY)
    path = study_file(tmp_path, text)
    out = tmp_path / "out"
    code, _, err = run(reproduce, [str(path), "--out", str(out)], capsys)
    assert code == 2
    line = one_line_error(err, message)
    assert line.startswith(f"reproduce.py: error: {path}:{_line(text, needle)}: "), line
    assert not out.exists()  # before any work


@pytest.mark.parametrize(("text", "message"), [
    ("name = 'x'\nscript = \n", "not a TOML file: "),
    ("name = 'x'\n[args]\nmethod = 'gradcam'\n", "no 'script' key"),
    ("name = 'x'\nscript = 'confidence'\n[args]\nmethod = 'gradcam'\n",
     "[args]: the following arguments are required: --img-path"),
])
def test_file_level_mistakes(text, message, tmp_path, capsys):
    path = study_file(tmp_path, text)
    code, _, err = run(reproduce, [str(path)], capsys)
    assert code == 2
    one_line_error(err, str(path), message)
    code, _, err = run(reproduce, [str(tmp_path / "absent.toml")], capsys)
    assert code == 2
    one_line_error(err, "absent.toml: no such study file")


@pytest.mark.parametrize(("sweep", "message"), [
    ("input-scale = [1.0, -1.0]", "point method=gradcam_input-scale=-1.0: --input-scale must be positive and finite"),
    ("crop-size = [180, 0]", "point method=gradcam_crop-size=0: -c/--crop-size must be"),
])
def test_a_point_its_flags_refuse_is_an_error_before_any_work(sweep, message, tmp_path, capsys):
    text = STUDY.replace("c = 180\n", "").replace('method = ["gradcam", "layercam"]', f'method = ["gradcam"]\n{sweep}')
    path = study_file(tmp_path, text)
    code, _, err = run(reproduce, [str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    one_line_error(err, f"{path}: {message}")
    assert not (tmp_path / "out").exists()


def test_point_folders_are_filesystem_safe_and_distinct(tmp_path, capsys):
    assert point_name({"alpha": 2, "name": "resnet50"}) == "alpha=2_name=resnet50"
    assert point_name({"name": "timm:vit/b 16", "ucag": True}) == "name=timm_vit_b_16_ucag=true"
    assert point_name({"percentiles": [10, 50.5]}) == "percentiles=10,50.5"
    assert point_name({}) == "run"
    long = point_name({"weights": "w" * 400})
    assert len(long) < 150 and long != point_name({"weights": "w" * 399})
    text = STUDY.replace('method = ["gradcam", "layercam"]', 'method = ["gradcam"]\nweights = ["a/b", "a:b"]')
    code, _, err = run(reproduce, [str(study_file(tmp_path, text))], capsys)
    assert code == 2
    line = one_line_error(err, "[sweep] weights: the values 'a/b' and 'a:b' share the folder "
                               "'method=gradcam_weights=a_b'")
    assert f"two.toml:{_line(text, 'weights = ')}:" in line


def test_sweeps_of_lists_and_switches(tmp_path):
    text = """script = "road"
[args]
method = "gradcam"
img-path = "examples"
[sweep]
percentiles = [[10, 50], [30]]
ucag = [true, false]
"""
    study = read_study(study_file(tmp_path, text))
    assert [p.name for p in study.points] == ["percentiles=10,50_ucag=true", "percentiles=10,50_ucag=false",
                                              "percentiles=30_ucag=true", "percentiles=30_ucag=false"]
    assert study.points[0].argv == ["gradcam", "--img-path", "examples", "--percentiles", "10", "50", "--ucag"]
    assert study.points[3].argv == ["gradcam", "--img-path", "examples", "--percentiles", "30"]
    assert study.points[0].args.percentiles == [10.0, 50.0] and study.name == "two"


def test_key_lines_scan():
    text = 'name = "x"\n# c\n[args]\n"img-path" = "a"\nalpha = 1\n[sweep]\n  method = [\n "a",\n]\n'
    lines = key_lines(text)
    assert lines[(None, "name")] == 1 and lines[("args", None)] == 3 and lines[("args", "img-path")] == 4
    assert lines[("args", "alpha")] == 5 and lines[("sweep", "method")] == 7 and ("sweep", "a") not in lines


def test_the_refused_sweeps_change_no_run_identity(tmp_path):
    """NOT_IDENTITY_FLAGS: each one's value leaves the run's identity as it was (those density.py has)."""
    from app.setup import build_setup
    parser = confidence.build_parser()
    base = ["gradcam", *HAND[:-4], "--out", str(tmp_path)]

    def identity(*extra):
        args = parser.parse_args([*base, *extra])
        return run_identity(args, build_setup(args), {}, "confidence")

    reference = identity()
    for flag, value in (("batch-size", "3"), ("workers", "1"), ("patch-batch", "2"), ("limit", "1")):
        assert flag in NOT_IDENTITY_FLAGS
        assert identity(f"--{flag}", value) == reference, flag
    assert identity("-a", "1.5") != reference  # a flag of the identity does change it
    assert {"out", "fresh", "score-batch"} <= set(NOT_IDENTITY_FLAGS)


def test_every_script_of_the_table_has_the_study_interface():
    for name, entry in SCRIPTS.items():
        module = entry.load()
        assert callable(module.build_parser) and callable(module.main) and module.PROG == f"{name}.py"


def test_report_of_a_numeric_sweep_with_series(tmp_path):
    rows = lambda base, ucag: [{"name": "gradcam", "ucag": False, "deletion": base, "insertion": 50.0},  # noqa: E731
                               {"name": "gradcam*", "ucag": True, "deletion": ucag, "insertion": 60.0}]
    points = [{"point": f"alpha={a}_name={m}", "sweep": {"alpha": a, "name": m}, "argv": [],
               "summary": {"n_images": 3, "rows": rows(10.0 + a, 9.0 + a)}}
              for m in ("resnet50", "vgg16") for a in (1, 2, 3)]
    points.append({"point": "alpha=4_name=vgg16", "sweep": {"alpha": 4, "name": "vgg16"}, "argv": [], "summary": None})
    study = {"name": "Scale", "script": "insdel", "points": points}
    written = write_study_report(tmp_path, study, ("deletion", "insertion"), 2, {"x": "alpha", "series": "name"})
    assert sorted(p.name for p in written) == ["plot_deletion.png", "plot_insertion.png", "study.json", "study.md"]
    table = (tmp_path / "study.md").read_text().splitlines()
    assert "| alpha | name | row | images | deletion | insertion |" in table
    assert "| 2 | vgg16 | gradcam* | 3 | 11.00 | 60.00 |" in table
    assert "| 4 | vgg16 | (not run) | - | - | - |" in table
    assert json.loads((tmp_path / "study.json").read_text()) == study


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_process_group_outlives_the_scripts_that_did_not_create_it(monkeypatch):
    """reproduce.py joins torchrun's group once; each point's script then finds it joined and leaves it."""
    port = _free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    torch_dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # what a script sees under torchrun: the group is joined already
        info, device = distributed.init("cpu")
        assert info.world == 2 and not info.owns_group and device == "cpu"
        distributed.finish(distributed.Dist(0, 1, 0))  # world 1: nothing to do
        distributed.finish(distributed.Dist(0, 2, 0, owns_group=False))
        assert torch_dist.is_initialized()
        distributed.finish(distributed.Dist(0, 2, 0, owns_group=True))
        assert not torch_dist.is_initialized()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    assert os.environ["WORLD_SIZE"] == "2"


STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_each_shipped_study_parses_and_dry_runs(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # the studies name their data relative to the repository
    study = read_study(path)
    assert study.points and study.script in SCRIPTS
    code, stdout, err = run(reproduce, [str(path), "--dry-run", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert stdout.startswith(f"study {study.name!r}: {study.script}.py, {len(study.points)} point(s)")
    assert not (tmp_path / "out").exists()


def test_the_demo_study_is_the_scale_sweep_and_two_methods_on_the_bundled_photos(tmp_path, capsys, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    study = read_study(root / "studies" / "demo.toml")
    assert study.sweep == {"method": ["gradcam", "layercam"], "input-scale": [1.0, 2.0, 3.0]}
    assert study.plot == {"x": "input-scale", "series": "method"} and study.args["img-path"] == "examples"
    code, stdout, _ = run(reproduce, ["studies/demo.toml", "--dry-run"], capsys)
    assert code == 0 and "folder results/studies/demo/" in stdout.splitlines()[0]
    assert stdout.count(": 4 image(s), ") == 6 and stdout.splitlines()[-1] == "24 image(s) over all points"


@pytest.mark.slow
def test_a_study_under_torchrun_equals_one_process(finished, tmp_path):
    """Two ranks: the process group joined once by reproduce.py, every point sharded by its script (a part per
    rank), the study's outputs written by rank 0, the summaries those of one process."""
    import subprocess
    import sys
    path, clean = finished
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    out = tmp_path / "two"
    result = subprocess.run([*launcher, "reproduce.py", str(path), "--out", str(out)],
                            cwd=Path(reproduce.__file__).parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for point in ("method=gradcam", "method=layercam"):
        assert sorted(p.name for p in (out / point / "parts").glob("part-*.jsonl")) == ["part-0.jsonl", "part-1.jsonl"]
        assert close(summary(out / point), summary(clean / point))  # ranks' thread counts: float rounding
    two, one = (json.loads((folder / "study.json").read_text())["points"] for folder in (out, clean))
    assert all(close(a["summary"], b["summary"]) for a, b in zip(two, one, strict=True))
    assert result.stdout.count("point(s); wrote ") == 1  # the study's outputs: rank 0 only
    assert (out / "report.html").is_file() and len(list((out / "gallery").rglob("*.png"))) == 4 * 2


def close(a, b) -> bool:
    """Summaries equal up to float rounding (rel 1e-5); names, flags and counts exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and not isinstance(b, bool):
        return b == pytest.approx(a, rel=1e-5, nan_ok=True)
    return a == b


SCALE_STUDY = f"""name = "Scale"
script = "confidence"

[args]
method = "gradcam"
{ARGS.replace("a = 1.0", "")}
[sweep]
a = [1.0, 1.5]
"""


def test_the_base_row_of_a_ucag_sweep_is_computed_once(tmp_path, capsys, monkeypatch):
    import evaluation.rows
    explained = []
    original = evaluation.rows.Row.explain_folds

    def counted(self, *args, **kwargs):
        explained.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(evaluation.rows.Row, "explain_folds", counted)
    path = study_file(tmp_path, SCALE_STUDY, "scale.toml")
    code, _, err = run(reproduce, [str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    # point a=1.0: both rows of its two batches (batch size 1); point a=1.5: the UCAG row only; then the
    # report's gallery (visualization.py, one batch of both rows)
    assert explained == ["gradcam", "gradcam*"] * 2 + ["gradcam*"] * 2 + ["gradcam", "gradcam*"]
    out = tmp_path / "out"
    record = json.loads((out / "study.json").read_text())
    assert record["points"][1]["argv"][-2:] == ["--base-from", str(out / "a=1.0")]
    by_hand = tmp_path / "hand"
    hand = [*HAND, "-a", "1.5"]
    hand[hand.index("-a") + 1] = "1.5"
    assert run(confidence, ["gradcam", *hand[:-2], "--out", str(by_hand)], capsys)[0] == 0
    assert summary(out / "a=1.5")["rows"] == summary(by_hand)["rows"]


def test_the_report_page_in_chromium(finished):
    """report.html: the study's table (a line per point and row), the figure, the gallery (a picture per image
    and method), the per-image table; rendered by headless Chromium."""
    from tests.test_html_report import Counter, browse
    _, out = finished
    page = out / "report.html"
    counted = Counter()
    counted.feed(browse(page, "--dump-dom").stdout)
    # summary: header + 2 points x 2 rows; gallery: header + the 4 bundled photos (the gallery's own limit, not
    # the study's --limit 2); per image: header + 2 points x 2 images
    assert counted.tables == [5, 5, 5]
    figures = sorted(path.name for path in out.glob("plot_*.png"))
    assert figures == ["plot_change.png", "plot_drop.png", "plot_increase.png"]
    assert counted.images == len(figures) + 4 * 2  # the plots, 4 photos x 2 methods
    assert all(source.startswith("data:image/png;base64,") for source in counted.sources)
    shot = out.parent / "shot.png"
    browse(page, f"--screenshot={shot}", "--window-size=1200,1600")
    import numpy as np
    from PIL import Image
    assert np.asarray(Image.open(shot).convert("L"), dtype=float).std() > 5
