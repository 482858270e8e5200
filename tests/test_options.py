"""The shared option checks (methods/options.py): values kept, bad ones refused with a MethodError naming the
option, in one wording; and the same checks reached through the registry and the command line."""
import numpy as np
import pytest
import torch

import visualization
from app.cli import run_cli
from methods import build_explainer
from methods.errors import MethodError
from methods.options import choice, flag, in_interval, integer, positive_int, positive_ints


def test_good_values_come_back_in_plain_types():
    assert positive_int("steps", 3) == 3 and type(positive_int("steps", np.int64(3))) is int
    assert positive_int("path_batch", None, optional=True) is None
    assert integer("seed", -4) == -4 and integer("seed", 0) == 0
    assert positive_ints("resolutions", [224, np.int32(324)]) == (224, 324)
    assert positive_ints("resolutions", range(1, 3)) == (1, 2)
    assert in_interval("p", 1, open_low=True) == 1.0 and type(in_interval("p", 1, open_low=True)) is float
    assert in_interval("baseline", 0) == 0.0 and in_interval("baseline", 1.0) == 1.0
    assert in_interval("x", 0.5, 0, 1, open_low=True, open_high=True) == 0.5
    assert flag("native_first", False) is False
    assert choice("fusion", "hard", ("soft", "hard")) == "hard"
    assert choice("formula", None, ("a",), optional=True) is None


@pytest.mark.parametrize("check,value,message", [
    (lambda v: positive_int("steps", v), 0, "steps must be a positive integer, got 0"),
    (lambda v: positive_int("steps", v), -2, "steps must be a positive integer, got -2"),
    (lambda v: positive_int("steps", v), 2.0, "steps must be a positive integer, got 2.0"),
    (lambda v: positive_int("steps", v), True, "steps must be a positive integer, got True"),
    (lambda v: positive_int("steps", v), "8", "steps must be a positive integer, got '8'"),
    (lambda v: positive_int("steps", v), None, "steps must be a positive integer, got None"),
    (lambda v: positive_int("path_batch", v, optional=True), 0,
     "path_batch must be a positive integer or None, got 0"),
    (lambda v: integer("seed", v), 1.5, "seed must be an integer, got 1.5"),
    (lambda v: integer("seed", v), False, "seed must be an integer, got False"),
    (lambda v: positive_ints("resolutions", v), [], "resolutions must be a non-empty sequence of positive integers"),
    (lambda v: positive_ints("resolutions", v), [64, 0], "resolutions must be a non-empty sequence"),
    (lambda v: positive_ints("resolutions", v), "224", "resolutions must be a non-empty sequence"),
    (lambda v: positive_ints("resolutions", v), 5, "resolutions must be a non-empty sequence"),
    (lambda v: positive_ints("resolutions", v), [True], "resolutions must be a non-empty sequence"),
    (lambda v: in_interval("p", v, open_low=True), 0, "p must be in (0, 1], got 0"),
    (lambda v: in_interval("p", v, open_low=True), 1.5, "p must be in (0, 1], got 1.5"),
    (lambda v: in_interval("p", v, open_low=True), "0.5", "p must be in (0, 1], got '0.5'"),
    (lambda v: in_interval("x", v, open_high=True), 1.0, r"x must be in [0, 1), got 1.0"),
    (lambda v: in_interval("baseline", v), float("nan"), "baseline must be in [0, 1], got nan"),
    (lambda v: in_interval("baseline", v), float("inf"), "baseline must be in [0, 1], got inf"),
    (lambda v: in_interval("baseline", v), -0.1, "baseline must be in [0, 1], got -0.1"),
    (lambda v: in_interval("baseline", v), True, "baseline must be in [0, 1], got True"),
    (lambda v: flag("native_first", v), "yes", "native_first must be True or False, got 'yes'"),
    (lambda v: flag("native_first", v), 1, "native_first must be True or False, got 1"),
    (lambda v: choice("fusion", v, ("soft", "hard")), "mean", "fusion must be one of soft, hard, got 'mean'"),
    (lambda v: choice("fusion", v, ("soft", "hard")), None, "fusion must be one of soft, hard, got None"),
])
def test_bad_values_raise_a_method_error_naming_the_option(check, value, message):
    with pytest.raises(MethodError) as caught:
        check(value)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("method,options,message", [
    ("igcam", {"baseline": 7.0}, "igcam: baseline must be in [0, 1], got 7.0"),
    ("igcam", {"baseline": -1.0}, "igcam: baseline must be in [0, 1], got -1.0"),
    ("igcam", {"baseline": "white"}, "igcam: baseline must be one of black, zeros, got 'white'"),
    ("igcam", {"steps": 0}, "igcam: steps must be a positive integer, got 0"),
    ("igcam", {"path_batch": 0}, "igcam: path_batch must be a positive integer or None, got 0"),
    ("cameras", {"resolutions": [64, -1]}, "cameras: resolutions must be a non-empty sequence of positive integers"),
    ("scorecam", {"mask_batch": 0}, "scorecam: mask_batch must be a positive integer or None, got 0"),
    ("rise", {"p": 0.0}, "rise: p must be in (0, 1], got 0.0"),
    ("rise", {"seed": 0.5}, "rise: seed must be an integer, got 0.5"),
    ("sise", {"mask_batch": -1}, "sise: mask_batch must be a positive integer or None, got -1"),
    ("adasise", {"fusion": "mean"}, "adasise: fusion must be one of soft, hard, got 'mean'"),
])
def test_registry_refuses_bad_options_with_one_message_style(method, options, message, lite):
    with pytest.raises(MethodError) as caught:
        build_explainer(method, lite, **options)
    assert str(caught.value).startswith(message), str(caught.value)


def test_igcam_pixel_baselines_inside_the_range_are_taken(lite):
    for value in (0.0, 0.5, 1.0):
        assert build_explainer("igcam", lite, baseline=value).baseline == value


def test_igcam_baseline_7_is_refused_on_the_command_line(tmp_path, capsys):
    """README: --baseline is black, zeros or a pixel value in [0, 1]; 7 is one line and exit code 2."""
    with pytest.raises(SystemExit) as stop:
        run_cli(visualization.main, ["igcam", "--baseline", "7", "--workers", "0", "--out", str(tmp_path)],
                prog=visualization.PROG)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line and not line.startswith("warning:")]
    assert stop.value.code == 2 and "Traceback" not in err
    assert lines == ["visualization.py: error: igcam: baseline must be in [0, 1], got 7.0"], err
    assert not any(tmp_path.iterdir())  # refused before anything was explained or written


def test_registry_builds_with_the_defaults_unchanged(lite):
    explainer = build_explainer("rise", lite)
    assert (explainer.n_masks, explainer.cell, explainer.p, explainer.seed, explainer.mask_batch) == (
        4000, 7, 0.5, 0, None)  # None: chunks from free memory (methods.batching)
    igcam = build_explainer("igcam", lite)
    assert (igcam.steps, igcam.baseline, igcam.path_batch, igcam.formula) == (50, "black", 256, "integrated")
    assert torch.allclose(igcam.baseline_image(torch.zeros(1, 3, 4, 4)),
                          ((0 - torch.tensor(lite.mean)) / torch.tensor(lite.std)).view(1, 3, 1, 1))
