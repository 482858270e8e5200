"""--input-scale S (issue 24, point 6): the base row explains the whole image upscaled by S, as
ucag.UpscaledInput; S = 1 is today's row; S is part of the run's identity; bad values are one-line errors."""
import json

import pytest
import torch

import density
import visualization
from app.flags import Parser, UsageError, add_common_flags
from app.setup import build_setup
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import FAST, run
from tests.test_resume import one_line_error
from ucag import UpscaledInput


def setup_for(*flags):
    parser = Parser(prog="t")
    add_common_flags(parser)
    return build_setup(parser.parse_args(["gradcam", "--ucag", "-n", "2", "-c", "180", "--device", "cpu", *flags]))


def test_scale_one_is_todays_base_row_bit_for_bit(photo_batch):
    today = setup_for()
    scaled = setup_for("--input-scale", "1")
    assert scaled.rows()[0].explainer is scaled.ucag.explainer  # no wrapper at S = 1
    assert today.settings()["input_scale"] == scaled.settings()["input_scale"] == 1.0
    targets = torch.tensor([285, 967])
    x = photo_batch[1:3]
    assert torch.equal(today.rows()[0].explainer(x, targets).maps, scaled.rows()[0].explainer(x, targets).maps)


def test_scale_two_is_the_method_on_the_upscaled_image(photo_batch):
    setup = setup_for("--input-scale", "2")
    base, ucag_row = setup.rows()
    assert isinstance(base.explainer, UpscaledInput) and base.explainer.alpha == 2.0 and base.name == "gradcam"
    assert ucag_row.explainer is setup.ucag and not isinstance(setup.ucag.explainer, UpscaledInput)
    assert setup.settings()["input_scale"] == 2.0 and setup.input_scale == 2.0
    targets = torch.tensor([285, 967])
    x = photo_batch[1:3]
    expected = UpscaledInput(setup.ucag.explainer, 2)(x, targets)
    got = base.explainer(x, targets)
    assert got.maps.shape[-1] > 7  # the map of a 448-px input
    assert torch.equal(got.maps, expected.maps) and torch.equal(got.logits, expected.logits)


def test_official_alpha_one_takes_the_flag(photo_batch):
    setup = setup_for("--official", "-a", "1", "--input-scale", "1.5")
    assert isinstance(setup.rows()[0].explainer, UpscaledInput) and setup.rows()[0].explainer.alpha == 1.5
    assert "baseline_alpha" not in setup.settings()


@pytest.mark.parametrize(("flags", "needle"), [
    (["--input-scale", "0"], "--input-scale must be positive and finite (got 0)"),
    (["--input-scale", "-2"], "--input-scale must be positive and finite (got -2)"),
    (["--input-scale", "nan"], "--input-scale must be positive and finite (got nan)"),
    (["--input-scale", "inf"], "--input-scale must be positive and finite (got inf)"),
    (["--input-scale", "40"], "above the 4096 px limit"),
    (["--input-scale", "0.01"], "below the"),
    (["--official", "-a", "2", "--input-scale", "2"], "--input-scale 2 with --official and -a 2"),
])
def test_bad_scales_are_usage_errors(flags, needle):
    with pytest.raises(UsageError) as error:
        setup_for(*flags)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_bad_scale_from_the_command_line_is_one_line(tmp_path, capsys):
    for value, needle in (("abc", "argument --input-scale: invalid float value: 'abc'"),
                          ("0", "--input-scale must be positive and finite")):
        code, _, err = run(density, ["gradcam", *FAST, "--img-path", str(EXAMPLES), "--limit", "1",
                                     "--out", str(tmp_path / "out"), "--input-scale", value], capsys)
        assert code == 2
        one_line_error(err, needle)
    assert not (tmp_path / "out" / "run.json").exists()


def test_scale_is_the_runs_identity_and_old_folders_imply_one(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *FAST, "--img-path", str(EXAMPLES), "--limit", "1", "--out", str(out)]
    assert run(density, argv, capsys)[0] == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["input_scale"] == 1.0
    code, _, err = run(density, argv + ["--input-scale", "2"], capsys)
    assert code == 2
    one_line_error(err, "holds results of other settings (input_scale: 1.0 -> 2.0)")
    # a run.json written before the flag existed: S = 1 implied, resumed
    del recorded["input_scale"]
    (out / "run.json").write_text(json.dumps(recorded))
    code, _, err = run(density, argv, capsys)
    assert code == 0, err
    code, _, err = run(density, argv + ["--input-scale", "2"], capsys)
    assert code == 2 and "input_scale: 1.0 -> 2.0" in err

    scaled = tmp_path / "scaled"
    argv = ["gradcam", *FAST, "--img-path", str(EXAMPLES), "--limit", "1", "--out", str(scaled), "--input-scale", "2"]
    assert run(density, argv, capsys)[0] == 0
    assert json.loads((scaled / "run.json").read_text())["input_scale"] == 2.0
    rows = {r["name"]: r for r in json.loads((scaled / "summary.json").read_text())["rows"]}
    plain = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["gradcam*"] == plain["gradcam*"]  # the UCAG row is unchanged
    assert rows["gradcam"] != plain["gradcam"]


def test_visualization_labels_the_upscaled_row(tmp_path, monkeypatch, capsys):
    titles = []
    monkeypatch.setattr(visualization, "save_panels", lambda path, panels, header="": titles.append(
        [title for _, title in panels]))
    argv = ["gradcam", *FAST, "--img-path", str(EXAMPLES / "chelsea.jpg"), "--out", str(tmp_path), "--input-scale", "2"]
    with pytest.raises(SystemExit) as stop:
        visualization.run_cli(visualization.main, argv, prog=visualization.PROG)
    assert stop.value.code == 0, capsys.readouterr().err
    assert titles[0][:2] == ["input", "gradcam x2.0"] and titles[0][2].startswith("gradcam + UCAG")
