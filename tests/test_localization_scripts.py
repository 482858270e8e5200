"""pointing_game.py and segmentation.py end to end on tiny datasets; resume; torchrun; bad inputs."""
import csv
import json
import subprocess
import sys

import pytest

import pointing_game
import segmentation
from tests.conftest import REPO
from tests.localization_fixtures import coco_dataset, segmentation_file, voc_dataset
from tests.test_eval_scripts import free_port, run

FAST = ["--ucag", "-n", "2", "-a", "1.0", "-c", "180", "--workers", "0", "--device", "cpu"]


def test_pointing_game_on_voc_with_difficult_list(tmp_path, capsys):
    root = voc_dataset(tmp_path / "data")
    flags = tmp_path / "difficult.txt"
    row = ["0"] * 20
    row[13] = "1"  # motorbike in 000002 is 'difficult'
    flags.write_text("000001\t" + "\t".join(["0"] * 20) + "\n000002\t" + "\t".join(row) + "\n")
    out = tmp_path / "out"
    code, stdout, err = run(pointing_game, ["gradcam", *FAST, "--dataset", "voc07", "--data-root", str(root),
                                            "--weights", "random", "--difficult-list", str(flags),
                                            "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["n_pairs"] == 4
    assert [(r["name"], r["ucag"]) for r in summary["rows"]] == [("center", False), ("gradcam", False),
                                                                 ("gradcam*", True)]
    for entry in summary["rows"]:
        assert set(entry) == {"name", "ucag", "pointing_all", "pointing_difficult", "energy_all", "energy_difficult"}
        assert 0 <= entry["pointing_all"] <= 100 and 0 <= entry["pointing_difficult"] <= 100
    center = summary["rows"][0]
    # the centre of each image lies inside every annotated box of these three images: 4 of the 20 classes are
    # hit, the other 16 have no pair and count as 0 (TorchRay's mean over all classes); the difficult subset
    # holds motorbike (flagged) and the pairs of 000003 (not in the list: TorchRay counts them there too)
    assert center["pointing_all"] == pytest.approx(100 * 4 / 20)
    assert center["pointing_difficult"] == pytest.approx(100 * 3 / 20)
    assert summary["aggregation"] == "torchray"
    rows = {r["name"]: r for r in csv.DictReader(open(out / "per_class.csv"))}
    assert rows["motorbike"]["pairs_difficult"] == "1" and rows["cat"]["pairs_difficult"] == "0"
    assert "not in" in err + stdout  # 000003 is missing from the list
    table = (out / "table.md").read_text()
    assert "| center | 20.0/15.0 |" in table and "| vgg16 | voc07 |" in table

    # the documented alternatives: mean over the classes with pairs; unlisted images in 'all' only
    other = tmp_path / "other"
    code, stdout, err = run(pointing_game, ["center", "--workers", "0", "--device", "cpu", "--dataset", "voc07",
                                            "--data-root", str(root), "--weights", "random", "--difficult-list",
                                            str(flags), "--aggregation", "evaluated-classes", "--unlisted",
                                            "all-only", "--out", str(other)], capsys)
    assert code == 0, err
    summary = json.loads((other / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["center"]
    assert summary["rows"][0]["pointing_all"] == pytest.approx(100.0)
    assert summary["rows"][0]["pointing_difficult"] == pytest.approx(100.0)  # motorbike alone
    assert "over the classes with pairs" in (other / "table.md").read_text() and "all-only" in err + stdout


def test_pointing_game_on_coco_with_resume(tmp_path, capsys):
    root = coco_dataset(tmp_path / "coco")
    out = tmp_path / "out"
    argv = ["layercam", *FAST, "--dataset", "coco14", "--data-root", str(root), "--name", "resnet50",
            "--weights", "random", "--batch-size", "1", "--out", str(out)]

    def interrupt(number):
        if number == 0:
            raise KeyboardInterrupt

    assert run(pointing_game, argv, capsys, on_batch=interrupt)[0] == 130
    assert len((out / "parts" / "part-0.jsonl").read_text().splitlines()) == 1
    code, _, err = run(pointing_game, argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["n_pairs"] == 2
    assert summary["rows"][0]["pointing_difficult"] is None  # no difficult list given


def test_segmentation_end_to_end(tmp_path, capsys):
    data = segmentation_file(tmp_path / "gtsegs_ijcv.mat")
    out = tmp_path / "out"
    code, stdout, err = run(segmentation, ["gradcam", *FAST, "--data", str(data), "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 2 and [r["name"] for r in summary["rows"]] == ["gradcam", "gradcam*"]
    for entry in summary["rows"]:
        assert 0 < entry["pixel_accuracy"] <= 1 and 0 < entry["map"] <= 1
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0].startswith("file,target,gradcam_correct,gradcam_labelled,gradcam_ap") and len(lines) == 3
    assert "| Pixel Acc. |" in (out / "table.md").read_text()


def test_segmentation_under_torchrun_equals_one_process(tmp_path):
    data = segmentation_file(tmp_path / "gtsegs_ijcv.mat")
    argv = ["gradcam", *FAST, "--data", str(data), "--batch-size", "1"]
    one = subprocess.run([sys.executable, "segmentation.py", *argv, "--out", str(tmp_path / "one")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", "segmentation.py", *argv,
                          "--workers", "1", "--out", str(tmp_path / "two")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    for a, b in zip(first["rows"], second["rows"], strict=True):
        assert a["pixel_accuracy"] == pytest.approx(b["pixel_accuracy"])
        assert a["map"] == pytest.approx(b["map"], rel=1e-5)


@pytest.mark.parametrize("module,argv,message", [
    (pointing_game, ["--dataset", "voc07", "--data-root", "{tmp}/none", "--weights", "random"], "no VOC2007 folder"),
    (pointing_game, ["--dataset", "coco14", "--data-root", "{tmp}", "--weights", "random"], "missing COCO annotation"),
    (pointing_game, ["--dataset", "voc07", "--data-root", "{voc}", "--weights", "random",
                     "--difficult-list", "{tmp}/none.txt"], "difficult list not found"),
    (pointing_game, ["--dataset", "voc07", "--data-root", "{voc}"], "needs --weights PATH"),
    (pointing_game, ["--dataset", "voc07", "--data-root", "{voc}", "--name", "vgg19", "--weights", "random"],
     "supports --name vgg16 or resnet50"),
    (segmentation, ["--data", "{tmp}/gtsegs_ijcv.mat"], "segmentation file not found"),
])
def test_bad_localization_inputs(module, argv, message, tmp_path, capsys):
    voc = voc_dataset(tmp_path / "data")
    argv = [a.format(tmp=tmp_path, voc=voc) for a in argv]
    code, _, err = run(module, ["gradcam", *argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_voc_image_with_unknown_class_is_skipped_not_fatal(tmp_path, capsys):
    root = voc_dataset(tmp_path / "data")
    xml = root / "VOC2007" / "Annotations" / "000003.xml"
    xml.write_text(xml.read_text().replace("bottle", "unicorn"))
    (root / "VOC2007" / "Annotations" / "000002.xml").unlink()
    out = tmp_path / "out"
    code, stdout, err = run(pointing_game, ["center", "--workers", "0", "--dataset", "voc07", "--data-root",
                                            str(root), "--weights", "random", "--out", str(out)], capsys)
    assert code == 0, err
    skipped = (out / "skipped.txt").read_text()
    assert "class 'unicorn' is not a VOC class" in skipped and "missing annotation file" in skipped
    assert json.loads((out / "summary.json").read_text())["n_images"] == 1


@pytest.mark.parametrize("method", ["gradient", "guided", "deconv"])
def test_pointing_game_baselines_run_end_to_end(method, tmp_path, capsys):
    root = voc_dataset(tmp_path / "data")
    out = tmp_path / "out"
    code, _, err = run(pointing_game, [method, *FAST, "--dataset", "voc07", "--data-root", str(root),
                                       "--weights", "random", "--out", str(out)], capsys)
    assert code == 0, err
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["name"] for r in rows][:2] == ["center", method]
    assert all(0 <= r["pointing_all"] <= 100 for r in rows)


@pytest.mark.parametrize("script", ["insdel", "density", "pointing", "segmentation"])
def test_official_baseline_is_the_same_in_every_script(script, tmp_path, capsys, monkeypatch):
    """--official with alpha != 1 means one baseline everywhere: the explainer on the alpha-upscaled image,
    recorded in run.json; without --official no script upscales it."""
    import density
    import insdel
    from tests.conftest import EXAMPLES
    from ucag.framework import UpscaledInput

    calls = []
    original = UpscaledInput.explain

    def counted(self, x, targets):
        calls.append(tuple(x.shape))
        return original(self, x, targets)

    monkeypatch.setattr(UpscaledInput, "explain", counted)
    geometry = ["--ucag", "-n", "2", "-a", "1.5", "-c", "180", "--workers", "0", "--device", "cpu"]
    if script in ("insdel", "density"):
        module = insdel if script == "insdel" else density
        data = ["--img-path", str(EXAMPLES / "coffee.jpg")] + (["--step", str(224 * 112)] if script == "insdel" else [])
    elif script == "pointing":
        module = pointing_game
        data = ["--dataset", "voc07", "--data-root", str(voc_dataset(tmp_path / "voc")), "--weights", "random",
                "--name", "resnet50", "--limit", "1"]
    else:
        module = segmentation
        data = ["--data", str(segmentation_file(tmp_path / "gtsegs_ijcv.mat")), "--limit", "1"]
    for official in (True, False):
        calls.clear()
        out = tmp_path / f"out-{official}"
        flags = ["--official"] if official else []
        code, _, err = run(module, ["gradcam", *geometry, *flags, *data, "--out", str(out)], capsys)
        assert code == 0, err
        recorded = json.loads((out / "run.json").read_text())
        if official:
            assert calls and recorded["baseline_alpha"] == 1.5 and recorded["official"] is True
        else:
            assert not calls and "baseline_alpha" not in recorded


def test_pointing_subset_without_any_pair_is_one_line_error(tmp_path, capsys):
    """--limit can pick only images whose objects are all 'difficult': no empty table, one line saying why."""
    from xml.etree import ElementTree

    root = voc_dataset(tmp_path / "data")
    voc = next(root.rglob("Annotations"))
    first = sorted(voc.glob("*.xml"))[0]
    tree = ElementTree.parse(first)
    for difficult in tree.iter("difficult"):
        difficult.text = "1"
    tree.write(first)
    code, _, err = run(pointing_game, ["center", "--workers", "0", "--device", "cpu", "--dataset", "voc07",
                                       "--data-root", str(root), "--weights", "random", "--limit", "1",
                                       "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "has a class to point at" in err and "Traceback" not in err


# Table 2's rows added by issue 22, each with UCAG on both datasets; the paper's cells stand beside ours
TABLE2_METHODS = {"mwp": [], "cmwp": [], "normgrad": [], "extremal": ["--max-iter", "3"]}


@pytest.mark.parametrize("dataset", ["voc07", "coco14"])
@pytest.mark.parametrize("method", sorted(TABLE2_METHODS))
def test_table2_methods_with_ucag_fill_the_paper_rows(method, dataset, tmp_path, capsys):
    root = voc_dataset(tmp_path / "data") if dataset == "voc07" else coco_dataset(tmp_path / "data")
    name = "vgg16" if dataset == "voc07" else "resnet50"
    out = tmp_path / "out"
    code, _, err = run(pointing_game, [method, *FAST, *TABLE2_METHODS[method], "--dataset", dataset, "--data-root",
                                       str(root), "--name", name, "--weights", "random", "--limit", "1",
                                       "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["name"], r["ucag"]) for r in summary["rows"]] == [("center", False), (method, False),
                                                                 (f"{method}*", True)]
    table = (out / "table.md").read_text()
    paper = json.loads((REPO / "evaluation" / "resources" / "paper_tables.json").read_text())["table2_pointing_game"]
    cell = paper["rows"][method][paper["columns"].index(f"{dataset}_{name}")]  # None: NormGrad on COCO
    expected = "-" if cell is None else f"{cell[0]}/{cell[1]}"
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    ours = next(r for r in summary["rows"] if r["name"] == method)
    assert lines[f"| {method}"].startswith(f"| {method} | {ours['pointing_all']:.1f}/")
    assert lines[f"| {method}"].endswith(f"| {expected} |")  # the paper's cell beside ours
    assert lines[f"| {method}*"].endswith("| - |") and lines["| center"].endswith(" |")
