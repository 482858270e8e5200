"""Sanity checks (evaluation/randomisation.py, evaluation/similarity.py, evaluation/sanity_task.py, sanity.py):
the random weights and their restoration, the similarities against scipy / skimage, Quantus' MPRT and
RandomLogit on the same maps, layers and weights (test-only peer), and the script end to end."""
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from skimage.feature import hog
from skimage.metrics import structural_similarity
from torch import nn

import sanity
from evaluation.randomisation import (
    RandomisationError,
    RandomWeights,
    draw_layer,
    parameter_layers,
    randomised,
    set_step,
)
from evaluation.rows import Row
from evaluation.sanity_task import SanityTask, random_class
from evaluation.similarity import FIELDS, Reference, compare, hog_features, input_maps, ranks, ssim
from methods import build_explainer
from methods.postprocess import min_max
from models import ModelSpec
from tests.conftest import EXAMPLES
from tests.test_eval_scripts import run
from tests.test_resume import one_line_error

QUICK = ["--workers", "0", "--device", "cpu"]
CLASSES = 10
SIZE = 32


def tiny_net() -> nn.Module:
    """Two conv + BN + ReLU blocks and a linear head: few layers, so Quantus' loops are fast."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    with torch.no_grad():  # non-trivial running statistics, so that BatchNorm's reset shows
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


def tiny_spec(model: nn.Module) -> ModelSpec:
    return ModelSpec("tiny", model, "3", tuple(str(i) for i in range(CLASSES)), input_size=(SIZE, SIZE),
                     min_side=8)


def tiny_batch(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def tiny_task(model: nn.Module, mode: str, seed: int = 7, method: str = "gradcam") -> SanityTask:
    spec = tiny_spec(model)
    return SanityTask([], spec, torch.device("cpu"), [Row(method, build_explainer(method, spec))], mode, seed,
                      "pred")


def our_steps(task: SanityTask, x: torch.Tensor, targets: torch.Tensor, others=None) -> dict[str, np.ndarray]:
    """{similarity: (steps, B)} of the task's own code path on a batch."""
    reference = Reference.of(next(iter(task.originals(x, targets, None).values())))
    scores = {name: [] for name in FIELDS}

    def visit(step, maps):
        for name, value in compare(reference, next(iter(maps.values()))).items():
            scores[name].append(value.numpy())

    task.step_maps(x, targets, None, others, visit)
    return {name: np.stack(values) for name, values in scores.items()}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


# ---- randomisation ----------------------------------------------------------------------------------------

def test_parameter_layers_from_the_logits_down():
    names = [name for name, _ in parameter_layers(tiny_net())]
    assert names == ["8", "4", "3", "1", "0"]
    with pytest.raises(RandomisationError, match="has no parameters"):
        parameter_layers(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_random_weights_are_quantus_reset_and_leave_the_global_generator_alone():
    net = tiny_net()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    drawn = draw_layer(net[3], seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # fork_rng: the caller's CPU generator is untouched
    replica = nn.Conv2d(6, 8, 3, padding=1)
    torch.manual_seed(6)  # seed + 1, as Quantus' get_random_layer_generator
    replica.reset_parameters()
    assert torch.equal(drawn["weight"], replica.weight) and torch.equal(drawn["bias"], replica.bias)
    norm = draw_layer(net[1], seed=5)  # BatchNorm: weight 1, bias 0, running statistics reset
    assert torch.equal(norm["weight"], torch.ones(6)) and torch.equal(norm["bias"], torch.zeros(6))
    assert torch.equal(norm["running_mean"], torch.zeros(6)) and torch.equal(norm["running_var"], torch.ones(6))


class NoCopy:
    """A hook's owner that must not be deep-copied (an explainer holding the whole model)."""

    def __deepcopy__(self, memo):
        raise AssertionError("deep-copied")

    def hook(self, module, inputs, output):
        return output


def test_drawing_copies_only_the_layer_not_what_its_hooks_hold():
    net = tiny_net()
    net[3].register_forward_hook(NoCopy().hook)
    weight = net[3].weight.clone()
    drawn = draw_layer(net[3], seed=0)
    assert torch.equal(net[3].weight, weight) and not torch.equal(drawn["weight"], weight)


class Scale(nn.Module):
    """A module owning a parameter but no reset_parameters: the normal_(std=0.01) fallback."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((4000,), 3.0))

    def forward(self, x):
        return x * self.gain[0]


def test_fallback_without_reset_parameters():
    drawn = draw_layer(Scale(), seed=0)["gain"]
    assert abs(float(drawn.std()) - 0.01) < 1e-3 and abs(float(drawn.mean())) < 1e-3


def test_cascading_and_independent_steps_and_restore():
    net = tiny_net()
    before = state_of(net)
    layers = parameter_layers(net)
    weights = RandomWeights(layers, seed=1)
    with randomised(layers) as snapshot:
        set_step(weights, snapshot, "cascading", 0)
        set_step(weights, snapshot, "cascading", 1)
        assert not torch.equal(net[8].weight, before["8.weight"]) and not torch.equal(net[4].running_var,
                                                                                        before["4.running_var"])
        assert torch.equal(net[3].weight, before["3.weight"])
    assert_bitwise(net, before)
    with randomised(layers) as snapshot:
        set_step(weights, snapshot, "independent", 0)
        set_step(weights, snapshot, "independent", 1)  # layer 0 back, only layer 1 random
        assert torch.equal(net[8].weight, before["8.weight"]) and not torch.equal(net[4].weight,
                                                                                   before["4.weight"])
    assert_bitwise(net, before)


def test_keyboard_interrupt_mid_randomisation_restores_the_model_bitwise():
    net = tiny_net()
    before = state_of(net)
    task = tiny_task(net, "cascading")
    x = tiny_batch(2)
    calls = []

    def visit(step, maps):
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        task.step_maps(x, torch.tensor([1, 2]), None, None, visit)
    assert calls == [0, 1, 2]
    assert_bitwise(net, before)
    assert float(torch.tensor([1e-39]) * 1.0) > 0  # denormals are no longer flushed to zero


def test_random_weights_do_not_depend_on_the_device(device):
    net = tiny_net()
    layers = parameter_layers(net)
    on_cpu = {name: RandomWeights(layers, 4).state(i) for i, (name, _) in enumerate(layers)}
    moved = tiny_net().to(device)
    moved_layers = parameter_layers(moved)
    weights = RandomWeights(moved_layers, 4)
    with randomised(moved_layers) as snapshot:
        for index in range(len(moved_layers)):
            set_step(weights, snapshot, "cascading", index)
        for (name, module) in moved_layers:
            for key, value in on_cpu[name].items():
                assert torch.equal(getattr(module, key).cpu(), value), (name, key)


# ---- similarities -----------------------------------------------------------------------------------------

def test_similarities_equal_scipy_and_skimage():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 1, 40, 48, generator=generator)
    b = a + 0.7 * torch.randn(3, 1, 40, 48, generator=generator)
    a[0, 0, :10] = 0.25  # ties
    b[1] = torch.round(b[1] * 2) / 2  # many ties
    flat = a.flatten(1).numpy()
    np.testing.assert_array_equal(ranks(a.flatten(1)).numpy(), scipy.stats.rankdata(flat, axis=1))
    scores = compare(Reference.of(a), b)
    for i in range(3):
        x, y = a[i, 0].double().numpy(), b[i, 0].double().numpy()
        x01, y01 = (x - x.min()) / (x.max() - x.min()), (y - y.min()) / (y.max() - y.min())
        assert scores["spearman"][i] == pytest.approx(scipy.stats.spearmanr(x.ravel(), y.ravel())[0], abs=1e-12)
        assert scores["spearman_abs"][i] == pytest.approx(
            scipy.stats.spearmanr(np.abs(x).ravel(), np.abs(y).ravel())[0], abs=1e-12)
        assert scores["ssim"][i] == pytest.approx(structural_similarity(x01, y01, data_range=1.0), abs=1e-6)
        np.testing.assert_allclose(hog_features(min_max(a[i:i + 1]))[0].numpy(), hog(x01), atol=1e-6)
        assert scores["hog"][i] == pytest.approx(scipy.stats.pearsonr(hog(x01), hog(y01))[0], abs=1e-6)
        assert -1 <= scores["spearman"][i] <= 1 and scores["spearman"][i] < 0.99


def test_ssim_of_a_map_with_itself_is_one_and_constant_maps_are_nan():
    a = torch.rand(2, 1, 32, 32)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    flat = torch.zeros(1, 1, 32, 32)
    scores = compare(Reference.of(torch.cat([a[:1], flat])), torch.cat([flat, a[1:]]))
    assert all(math.isnan(float(v)) for value in scores.values() for v in value)


def test_input_maps_are_raw_and_bilinear():
    raw = torch.tensor([[[[-1.0, 2.0], [3.0, -4.0]]]])
    maps = input_maps(raw, (4, 4))
    assert maps.shape == (1, 1, 4, 4) and float(maps.min()) < 0  # signed: no ReLU, no min-max
    assert torch.allclose(maps, torch.nn.functional.interpolate(raw, size=(4, 4), mode="bilinear"))


# ---- Quantus on the same maps, layers and weights ---------------------------------------------------------

def quantus_explain(method: str, normalised: bool):
    """An explain_func for Quantus: our explainer on the model Quantus hands over, our maps at the input size
    (raw for Spearman, min-max [0, 1] for SSIM)."""
    def explain(model, inputs, targets, **kwargs):
        explainer = build_explainer(method, tiny_spec(model))
        maps = input_maps(explainer(torch.as_tensor(inputs), torch.as_tensor(targets)).maps, (SIZE, SIZE))
        return (min_max(maps) if normalised else maps).detach().numpy()
    return explain


def quantus_ssim_2d(a, b, batched=False, **kwargs):
    """Quantus' own ssim() per image on the 2-D maps. Its batched call flattens the maps to 1-D vectors first
    and returns a list, which MPRT 0.6.0 cannot take (it calls .tolist() on the result): an array here."""
    from quantus.functions.similarity_func import ssim as peer_ssim
    return np.array([peer_ssim(aa.reshape(SIZE, SIZE), bb.reshape(SIZE, SIZE)) for aa, bb in zip(a, b, strict=True)])


@pytest.mark.parametrize("order", ["top_down", "independent"])
@pytest.mark.parametrize("similarity", ["spearman", "ssim"])
def test_equals_quantus_mprt(order, similarity):
    quantus = pytest.importorskip("quantus")
    from quantus.functions.similarity_func import correlation_spearman
    net = tiny_net()
    x = tiny_batch(3)
    with torch.no_grad():
        targets = net(x).argmax(dim=1)
    seed = 11
    peer = quantus.MPRT(similarity_func=correlation_spearman if similarity == "spearman" else quantus_ssim_2d,
                        layer_order=order, seed=seed, return_average_correlation=False, abs=False,
                        normalise=False, disable_warnings=True)
    theirs = peer(model=net, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=None, device="cpu",
                  explain_func=quantus_explain("gradcam", similarity == "ssim"), batch_size=3)
    before = state_of(net)
    task = tiny_task(net, "cascading" if order == "top_down" else "independent", seed=seed)
    ours = our_steps(task, x, targets)[similarity]
    assert_bitwise(net, before)
    names = [name for name, _ in task.layers]
    layers = [name for name in theirs if name != "original"]
    # Quantus' layers: the modules with reset_parameters (here the same ones); independent: bottom-up
    assert layers == (names if order == "top_down" else names[::-1])
    np.testing.assert_allclose(theirs["original"], 1.0, atol=1e-6)
    for index, name in enumerate(names):
        np.testing.assert_allclose(ours[index], theirs[name], atol=1e-5, err_msg=name)
    assert np.ptp(ours) > 0.05  # the comparison is not of constants


@pytest.mark.parametrize("similarity", ["spearman", "ssim"])
def test_equals_quantus_random_logit_for_the_same_classes(similarity):
    quantus = pytest.importorskip("quantus")
    from quantus.functions.similarity_func import correlation_spearman
    net = tiny_net()
    x = tiny_batch(3)
    with torch.no_grad():
        targets = net(x).argmax(dim=1)
    explain = quantus_explain("gradcam", similarity == "ssim")
    asked = []

    def recording(model, inputs, targets, **kwargs):
        asked.append(np.asarray(targets).copy())
        return explain(model, inputs, targets)

    peer = quantus.RandomLogit(similarity_func=correlation_spearman if similarity == "spearman" else quantus_ssim_2d,
                               num_classes=CLASSES, seed=3, abs=False, normalise=False, disable_warnings=True)
    theirs = peer(model=net, x_batch=x.numpy(), y_batch=targets.numpy(), a_batch=None, device="cpu",
                  explain_func=recording, batch_size=3)
    others = torch.as_tensor(asked[-1])  # Quantus' random classes (np.random.seed per batch)
    assert not torch.any(others == targets)
    ours = our_steps(tiny_task(net, "logit"), x, targets, others)[similarity]
    np.testing.assert_allclose(ours[0], np.asarray(theirs, dtype=float), atol=1e-5)


def test_random_class_is_uniform_over_the_other_classes_and_keyed_by_the_image():
    draws = [random_class(f"img{i}.jpg", 3, 5, seed=42) for i in range(4000)]
    assert 3 not in draws and set(draws) == {0, 1, 2, 4}
    counts = np.bincount(draws, minlength=5)[[0, 1, 2, 4]]
    assert counts.min() > 900 and counts.max() < 1100
    assert random_class("a.jpg", 3, 5, 42) == random_class("a.jpg", 3, 5, 42)
    assert [random_class("a.jpg", 3, 1000, s) for s in range(5)] != [random_class("a.jpg", 3, 1000, 0)] * 5


# ---- the script -------------------------------------------------------------------------------------------

def summary_of(out):
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_gradient_maps_change_under_full_cascading_randomisation(tmp_path, capsys):
    out = tmp_path / "gradient"
    code, _, err = run(sanity, ["gradient", *QUICK, "--img-path", str(EXAMPLES), "--limit", "1", "--out", str(out)],
                       capsys)
    assert code == 0, err
    summary = summary_of(out)
    assert len(summary["layers"]) == len(summary["rows"][0]["steps"]) > 90  # every parameter layer of lite0
    last = summary["rows"][0]["steps"][-1]
    assert last["spearman"] < 0.3 and last["n"] == 1
    assert "| gradient |" in (out / "table.md").read_text() and "| passes |" in (out / "table.md").read_text()
    assert f"steps shown: 10 of {len(summary['layers'])}, evenly spaced" in (out / "table.md").read_text()


def test_center_does_not_depend_on_the_weights_and_fails(tmp_path, capsys):
    out = tmp_path / "center"
    code, _, err = run(sanity, ["center", *QUICK, "--img-path", str(EXAMPLES), "--limit", "1", "--max-steps", "4",
                                "--out", str(out)], capsys)
    assert code == 0, err
    steps = summary_of(out)["rows"][0]["steps"]
    assert len(steps) == 4 and all(step[f] == pytest.approx(1.0, abs=1e-9) for step in steps for f in FIELDS)
    assert "fails: the map does not depend on the weights" in (out / "table.md").read_text()


def test_script_outputs_with_ucag(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", "--ucag", "-n", "2", "-a", "1.0", "-c", "180", *QUICK, "--img-path", str(EXAMPLES),
            "--limit", "2", "--max-steps", "3", "--out", str(out)]
    code, stdout, err = run(sanity, argv, capsys)
    assert code == 0, err
    summary = summary_of(out)
    assert summary["mode"] == "cascading" and summary["weights_seed"] == 42 and summary["n_images"] == 2
    assert summary["layers"] == ["fc", "head.1", "head.0"]
    assert [(r["name"], r["ucag"]) for r in summary["rows"]] == [("gradcam", False), ("gradcam*", True)]
    for row in summary["rows"]:
        assert [s["layer"] for s in row["steps"]] == summary["layers"]
        assert set(row["steps"][0]) == {"layer", "n", *FIELDS, *(f"{f}_std" for f in FIELDS)}
        assert all(-1 <= s[f] <= 1 for s in row["steps"] for f in FIELDS)
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["metric"] == "sanity" and recorded["metric_version"] == 1
    assert recorded["mode"] == "cascading" and recorded["weights_seed"] == 42
    assert recorded["layers"] == ["fc", "head.1", "head.0"]
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0] == "file,target,row,step,layer,spearman,spearman_abs,ssim,hog" and len(lines) == 1 + 2 * 2 * 3
    table = (out / "table.md").read_text()
    assert "| gradcam* | head.0 |" in table and "every step shown (3)" in table
    assert (out / "sanity_curves.png").stat().st_size > 20000 and (out / "sanity_maps.png").stat().st_size > 10000
    assert (out / "skipped.txt").read_text() == ""
    # another seed or mode is another run
    code, _, err = run(sanity, argv + ["--weights-seed", "1"], capsys)
    assert code == 2 and "weights_seed: 42 -> 1" in err


def test_logit_mode(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(sanity, ["gradcam", "--mode", "logit", *QUICK, "--img-path", str(EXAMPLES), "--limit", "2",
                                "--out", str(out)], capsys)
    assert code == 0, err
    summary = summary_of(out)
    assert summary["layers"] == ["random logit"] and len(summary["rows"][0]["steps"]) == 1
    records = [json.loads(line) for line in (out / "parts" / "part-0.jsonl").read_text().splitlines()]
    for record in records:
        assert record["random_class"] == random_class(record["key"], record["target"], 1000, 42)
        assert len(record["rows"]["gradcam"]["spearman"]) == 1
    assert "random_class" in (out / "per_image.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_batch_size_does_not_change_the_numbers(mode, tmp_path, capsys):
    summaries = []
    for batch in (1, 2):
        out = tmp_path / f"b{batch}"
        code, _, err = run(sanity, ["gradcam", "--mode", mode, *QUICK, "--img-path", str(EXAMPLES), "--limit", "2",
                                    "--max-steps", "3", "--batch-size", str(batch), "--out", str(out)], capsys)
        assert code == 0, err
        summaries.append(summary_of(out))
    one, two = summaries
    for row_one, row_two in zip(one["rows"], two["rows"], strict=True):
        for step_one, step_two in zip(row_one["steps"], row_two["steps"], strict=True):
            for field in FIELDS:
                # HOG's hard orientation bins turn a float-rounding change of a map into a whole vote moved
                # between bins: 1e-6 holds for the others, HOG agrees to 1e-5
                tolerance = 1e-5 if field == "hog" else 1e-6
                assert step_one[field] == pytest.approx(step_two[field], abs=tolerance), field


class Stop(Exception):
    """Raised by a test's hook to stop a run part-way."""


def test_an_error_after_the_first_batch_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    argv = ["gradcam", "--mode", "independent", *QUICK, "--img-path", str(EXAMPLES), "--limit", "3",
            "--max-steps", "2", "--batch-size", "2"]
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert run(sanity, argv + ["--out", str(clean)], capsys)[0] == 0

    def fail(number):
        if number == 0:
            raise Stop

    with pytest.raises(Stop):
        sanity.main(argv + ["--out", str(resumed)], on_batch=fail)
    assert len((resumed / "parts" / "part-0.jsonl").read_text().splitlines()) == 2
    assert not (resumed / "summary.json").exists()
    assert run(sanity, argv + ["--out", str(resumed)], capsys)[0] == 0
    assert summary_of(resumed) == summary_of(clean)
    assert (resumed / "per_image.csv").read_text() == (clean / "per_image.csv").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--mode", "shuffle"], "argument --mode: invalid choice"),
    (["--weights-seed", "x"], "argument --weights-seed: invalid int value"),
    (["--weights-seed", "-1"], "--weights-seed must be 0 or more"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--mode", "logit", "--max-steps", "2"], "--max-steps has no effect with --mode logit"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    code, _, err = run(sanity, ["gradcam", *QUICK, "--img-path", str(EXAMPLES), *argv, "--out",
                                str(tmp_path / "out")], capsys)
    assert code == 2
    one_line_error(err, message)


def test_a_model_without_parameters_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import app.setup

    class Fixed(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 4)[:, :CLASSES]

    monkeypatch.setattr(app.setup, "load_model", lambda *args, **kwargs: ModelSpec(
        "fixed", Fixed(), "", tuple(str(i) for i in range(CLASSES))))
    code, _, err = run(sanity, ["center", *QUICK, "--img-path", str(EXAMPLES), "--limit", "1", "--out",
                                str(tmp_path / "out")], capsys)
    assert code == 2
    one_line_error(err, "has no parameters: there are no weights to randomise")
