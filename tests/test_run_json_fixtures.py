"""Folders written by the release before issue 21's refactorings resume: each dataset script's run.json of
that release (tests/fixtures/run_json/<script>.json, its paths written as {root}) is accepted by today's
script, which goes on from the records already there instead of refusing the folder.

Regenerate (only when a release is meant to stop resuming older folders): ``python -m tests.test_run_json_fixtures``.
"""
import json
from pathlib import Path

import pytest

import density
import insdel
import pointing_game
import segmentation
from tests.localization_fixtures import segmentation_file, voc_dataset
from tests.test_eval_scripts import imagenet_folder, run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "run_json"
FAST = ["--ucag", "-n", "2", "-c", "180", "--workers", "0", "--device", "cpu", "--batch-size", "1"]

# script -> (module, flags after the method's name and FAST, the data it needs under {root})
RUNS = {
    "insdel": (insdel, ["gradcam", *FAST, "-a", "1.0", "--step", "12544", "--img-path", "{root}/val"]),
    "density": (density, ["rise", *FAST, "-a", "1.0", "--masks", "8", "--mask-batch", "8", "--img-path", "{root}/val"]),
    "pointing_game": (pointing_game, ["gradcam", *FAST, "-a", "1.0", "--dataset", "voc07", "--data-root",
                                      "{root}/voc", "--weights", "random"]),
    "segmentation": (segmentation, ["gradcam", *FAST, "-a", "1.5", "--official", "--score", "--data",
                                    "{root}/seg.mat"]),
}


def make_data(root: Path) -> None:
    imagenet_folder(root / "val", broken=False)
    voc_dataset(root / "voc")
    segmentation_file(root / "seg.mat")


def argv(script: str, root: Path, out: Path, limit: int | None) -> list[str]:
    flags = [flag.replace("{root}", str(root)) for flag in RUNS[script][1]]
    return [*flags, "--out", str(out), *(["--limit", str(limit)] if limit else [])]


@pytest.mark.parametrize("script", sorted(RUNS))
def test_a_folder_of_the_earlier_release_resumes(script, tmp_path, capsys):
    make_data(tmp_path)
    out = tmp_path / "out"
    module = RUNS[script][0]
    code, _, err = run(module, argv(script, tmp_path, out, 1), capsys)  # one record, as the old release left it
    assert code == 0, err
    recorded = (FIXTURES / f"{script}.json").read_text().replace("{root}", str(tmp_path))
    (out / "run.json").write_text(recorded)
    code, stdout, err = run(module, argv(script, tmp_path, out, None), capsys)
    assert code == 0, err  # the old identity is today's: accepted, not refused
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] > 1  # resumed and went on


if __name__ == "__main__":  # write the fixtures from this release's runs
    import tempfile
    import warnings

    from app.lifecycle import run_cli
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_data(root)
        for script, (module, _) in RUNS.items():
            out = root / script
            try:
                run_cli(module.main, argv(script, root, out, 1), prog=module.PROG)
            except SystemExit as stop:
                assert stop.code == 0, script
            text = (out / "run.json").read_text().replace(str(root), "{root}")
            (FIXTURES / f"{script}.json").write_text(text)
            print(f"{script}: {FIXTURES / f'{script}.json'}")
