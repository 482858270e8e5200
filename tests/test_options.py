"""The shared option checks (methods/options.py): values kept, bad ones refused with a MethodError naming the
option, in one wording; and the same checks reached through the registry and the command line."""
import numpy as np
import pytest
import torch

import visualization
from app.lifecycle import run_cli
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


# --- the declarations (methods.options.Option): one per option, the flags, checks and run identity made from them

# per declared option: a good and a bad command-line value, the good one as the builder and run.json get it
GOOD = {"rule": (["epsilon"], "epsilon"), "epsilon": (["0.5"], 0.5), "mask_batch": (["3"], 3),
        "n_masks": (["100"], 100), "cell": (["5"], 5), "p": (["0.3"], 0.3), "seed": (["4"], 4),
        "steps": (["4"], 4), "baseline": (["0.5"], 0.5), "path_batch": (["16"], 16),
        "resolutions": (["224", "324"], [224, 324]), "head_fusion": (["max"], "max"),
        "discard_ratio": (["0.5"], 0.5), "alpha_eps": (["1e-6"], 1e-6), "activation_sum_eps": (["0"], 0.0),
        "postprocess_eps": (["1e-3"], 1e-3), "align_corners": (["false"], False), "clip_biases": (["off"], False),
        "formula": (["notebook"], "notebook"), "native_first": (["false"], False), "fusion": (["hard"], "hard"),
        "layers": (["layer3", "layer4"], ["layer3", "layer4"]), "saliency_layer": (["layer2"], "layer2"),
        "normgrad_variant": (["selective"], "selective"),
        "areas": (["0.1", "0.3"], [0.1, 0.3]), "max_iter": (["5"], 5), "step": (["4"], 4), "sigma": (["12"], 12.0),
        "num_levels": (["4"], 4), "smooth": (["0"], 0.0), "jitter": (["random"], "random")}
BAD = {"rule": ["nope"], "epsilon": ["nan"], "mask_batch": ["0"], "n_masks": ["0"], "cell": ["-1"], "p": ["0"],
       "seed": ["1.5"], "steps": ["0"], "baseline": ["7"], "path_batch": ["0"], "resolutions": ["224", "0"],
       "head_fusion": ["median"], "discard_ratio": ["1"], "alpha_eps": ["-1"], "activation_sum_eps": ["inf"],
       "postprocess_eps": ["0"], "align_corners": ["maybe"], "clip_biases": ["2"], "formula": ["paper"],
       "native_first": ["yes please"], "fusion": ["mean"], "layers": ["layer4", "layer4"],
       "saliency_layer": [" "], "normgrad_variant": ["multilayer"],
       "areas": ["0.1", "1"], "max_iter": ["0"], "step": ["0"], "sigma": ["-2"], "num_levels": ["1"],
       "smooth": ["-1"], "jitter": ["sometimes"]}


def declarations():
    from methods.registry import declared_options
    return list(declared_options().items())


def test_every_declared_option_is_in_the_tables_and_declared_once():
    """A new option needs its good and bad values here; no two declarations share a name or a flag."""
    names = [option.name for option, _ in declarations()]
    assert sorted(names) == sorted(GOOD) == sorted(BAD)
    flags = [option.flag for option, _ in declarations()]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)


def test_a_second_declaration_of_a_name_or_flag_is_refused():
    from methods.options import Option
    from methods.registry import register
    with pytest.raises(ValueError, match="clashes"):
        register("again", options=(Option("steps", "--steps-again", 1, positive_int, "m", type=int),))
    with pytest.raises(ValueError, match="clashes"):
        register("again", options=(Option("iterations", "--steps", 1, positive_int, "m", type=int),))
    from methods import available_methods
    assert "again" not in available_methods()


@pytest.mark.parametrize("option,methods", declarations(), ids=lambda v: getattr(v, "name", ""))
def test_each_option_has_a_flag_whose_help_names_methods_and_default(option, methods):
    parser = visualization.build_parser()
    action = next(a for a in parser._actions if option.flag in a.option_strings)
    assert action.default is None  # None: not given, so not recorded and the method's default applies
    assert action.help.startswith(f"{', '.join(methods)}: ") and f"(default {option.default_text()})" in action.help
    args = parser.parse_args([methods[0], option.flag, *GOOD[option.name][0]])
    from app.setup import explainer_options
    value = explainer_options(args, methods[0])[option.name]
    assert value == GOOD[option.name][1]


@pytest.mark.parametrize("option,methods", declarations(), ids=lambda v: getattr(v, "name", ""))
def test_each_option_refuses_a_bad_value_in_one_line(option, methods, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(visualization.main, [methods[0], option.flag, *BAD[option.name], "--workers", "0",
                                     "--out", str(tmp_path)], prog=visualization.PROG)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line and not line.startswith("warning:")]
    assert stop.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("visualization.py: error: ") and (option.name in lines[0] or option.flag in lines[0] or
                                                                option.name == "rule" and "LRP rule" in lines[0])
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def resnet18_spec():
    from models import load_model
    torch.manual_seed(0)
    return load_model("resnet18", "random")


@pytest.mark.parametrize("option,methods", declarations(), ids=lambda v: getattr(v, "name", ""))
def test_each_option_given_is_recorded_in_the_run_identity(option, methods, resnet18_spec):
    """run.json's method_options: the options given (tuples as lists), nothing for an option not given."""
    import json

    from app.setup import build_setup
    from methods.transformer import METHODS as TRANSFORMER_METHODS
    from tests.vit_fixtures import tiny_vit_spec
    method = methods[0]
    spec = tiny_vit_spec() if method in TRANSFORMER_METHODS else resnet18_spec
    parser = visualization.build_parser()
    for argv, recorded in (([option.flag, *GOOD[option.name][0]], {option.name: GOOD[option.name][1]}), ([], {})):
        setup = build_setup(parser.parse_args([method, "--device", "cpu", *argv]), load_spec=lambda device: spec)
        assert json.loads(json.dumps(setup.settings()))["method_options"] == recorded


def test_the_classes_keyword_defaults_are_the_declared_ones():
    """The Python API's defaults read the declarations: building by name or by class gives the same thing."""
    import inspect

    from methods.cam import GradCAMPlusPlus, XGradCAM
    from methods.cameras import CAMERAS
    from methods.excitation import ContrastiveExcitationBackprop, ExcitationBackprop
    from methods.extremal import ExtremalPerturbation
    from methods.gradients import FullGrad
    from methods.igcam import IntegratedGradCAM
    from methods.normgrad import NormGrad
    from methods.perturbation import RISE, ScoreCAM
    from methods.relevance import CLRP, LRP, SGLRP
    from methods.sise import SISE, AdaSISE
    from methods.transformer import Rollout
    classes = {"lrp": LRP, "scorecam": ScoreCAM, "rise": RISE, "sise": SISE, "adasise": AdaSISE,
               "igcam": IntegratedGradCAM, "cameras": CAMERAS, "rollout": Rollout, "clrp": CLRP, "sglrp": SGLRP,
               "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "fullgrad": FullGrad,
               "mwp": ExcitationBackprop, "cmwp": ContrastiveExcitationBackprop, "normgrad": NormGrad,
               "extremal": ExtremalPerturbation}
    seen = set()
    for option, methods in declarations():
        for method in methods:
            parameter = inspect.signature(classes[method]).parameters[option.name]
            if parameter.default is inspect.Parameter.empty:  # the class requires it; the builder's default
                continue  # (sise's layers: the block ends of the model) is the declared one
            assert parameter.default == option.default, (method, option.name)
            seen.add(method)
    assert seen == set(classes)


# today's defaults, written out: the declarations must keep them (every number unchanged)
TODAYS_DEFAULTS = {"lrp": {"rule": "zplus", "epsilon": 0.25}, "clrp": {"rule": "zplus", "epsilon": 0.25},
                   "sglrp": {"rule": "zplus", "epsilon": 0.25}, "scorecam": {"mask_batch": None},
                   "rise": {"n_masks": 4000, "cell": 7, "p": 0.5, "seed": 0, "mask_batch": None},
                   "sise": {"mask_batch": None, "fusion": None, "layers": None},
                   "adasise": {"mask_batch": None, "fusion": None, "layers": None},
                   "igcam": {"steps": 50, "baseline": "black", "path_batch": 256, "formula": "integrated"},
                   "cameras": {"resolutions": (224, 324, 424, 524, 624, 724, 824, 924), "native_first": True},
                   "gradcam++": {"alpha_eps": 0.0}, "xgradcam": {"activation_sum_eps": 1e-7},
                   "fullgrad": {"postprocess_eps": 1e-6, "align_corners": True, "clip_biases": True},
                   "rollout": {"head_fusion": "mean", "discard_ratio": 0.0}, "mwp": {"saliency_layer": None},
                   "cmwp": {"saliency_layer": None}, "normgrad": {"normgrad_variant": "identity"},
                   "extremal": {"areas": (0.025, 0.05, 0.1, 0.2), "max_iter": 800, "step": 7, "sigma": 21.0,
                                "num_levels": 8, "smooth": 0.09, "jitter": "alternate", "seed": 0}}


def test_declared_defaults_are_todays():
    from methods.registry import _OPTIONS
    declared = {method: {o.name: o.default for o in options} for method, options in _OPTIONS.items() if options}
    assert declared == TODAYS_DEFAULTS


@pytest.mark.parametrize("method", ["lrp", "clrp", "igcam", "rollout", "gradcam++", "xgradcam", "fullgrad"])
def test_default_options_give_the_maps_of_todays_explicit_defaults(method, resnet18_spec):
    from tests.vit_fixtures import tiny_vit_spec
    spec = tiny_vit_spec() if method == "rollout" else resnet18_spec
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    implicit = build_explainer(method, spec)(x, [1, 2]).maps
    explicit = build_explainer(method, spec, **TODAYS_DEFAULTS[method])(x, [1, 2]).maps
    assert torch.equal(implicit, explicit)
    igcam = build_explainer("igcam", resnet18_spec)
    assert (igcam.steps, igcam.baseline, igcam.path_batch) == (50, "black", 256)


def test_lrp_epsilon_flag_changes_the_map(tmp_path, photos):
    """visualization.py lrp --rule epsilon --epsilon 0.5 runs, and its map is not the default epsilon's."""
    from PIL import Image
    Image.fromarray(photos[0]).resize((96, 96)).save(tmp_path / "photo.png")
    maps = {}
    for epsilon in ([], ["--epsilon", "0.5"]):
        out = tmp_path / f"out{len(epsilon)}"
        torch.manual_seed(0)  # the same random weights for both runs
        with pytest.raises(SystemExit) as stop:
            run_cli(visualization.main, ["lrp", "--rule", "epsilon", *epsilon, "--name", "resnet18", "--weights",
                                         "random", "--img-path", str(tmp_path / "photo.png"), "--workers", "0",
                                         "--out", str(out)], prog=visualization.PROG)
        assert stop.value.code == 0
        maps[len(epsilon)] = np.load(next(out.rglob("*_lrp.npy")))
    assert maps[0].shape == maps[2].shape and not np.array_equal(maps[0], maps[2])


# the keywords a builder fills from the ModelSpec (the model, its layers, preprocessing, label kind), not options
FROM_THE_SPEC = {"model", "layer", "activation_post", "multilabel", "mean", "std", "model_name", "bounds",
                 "posts"}


def test_every_keyword_of_every_registered_method_is_a_declared_option(resnet18_spec):
    """Every keyword the registered classes take (beyond what the spec gives) is declared for that method, so
    it has a flag (issue 21: every option reachable from the command line, LRP's epsilon included)."""
    import inspect

    from methods import available_methods
    from methods.registry import method_options
    from methods.transformer import METHODS as TRANSFORMER_METHODS
    from tests.vit_fixtures import tiny_vit_spec
    for method in available_methods():
        spec = tiny_vit_spec() if method in TRANSFORMER_METHODS else resnet18_spec
        cls = type(build_explainer(method, spec))
        keywords = {name for name, parameter in inspect.signature(cls).parameters.items()
                    if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)}
        assert keywords - FROM_THE_SPEC == set(method_options(method)), method
