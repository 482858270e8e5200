"""UCAG's blend of overlapping crop maps (issue 15): the paper's constant fold V(., Gamma), kept exactly, and
the seamless Gaussian-windowed overlap-add; the --blend flag, the run identity and visualization's default."""
import json

import numpy as np
import pytest
import torch

import insdel
import ucag.protocol as protocol_module
import visualization
from common.images import load_rgb
from common.render import overlay
from evaluation import store as store_module
from evaluation.store import ResultStore
from methods import build_explainer
from models import preprocess
from tests.conftest import EXAMPLES
from tests.test_cli import run as run_visualization
from tests.test_eval_scripts import run
from tests.test_resume import QUICK, STEP, one_line_error
from tests.test_ucag import PatchStub, make_ucag
from ucag import UCAG, CropGrid
from ucag.blending import SIGMA_FRACTION, blend_fold, gaussian_window, window_sum

# (H, W), c, n: the paper's geometry, non-square inputs, strides that do not divide (last crop flush with
# the border), crops overlapping a lot or hardly, odd and even crop sides
GEOMETRIES = [((224, 224), 124, 6), ((230, 301), 124, 6), ((97, 50), 60, 4), ((299, 299), 124, 6),
              ((224, 224), 224, 3), ((64, 200), 150, 2), ((123, 77), 100, 5)]


def per_crop_constants(grid: CropGrid, values: torch.Tensor) -> torch.Tensor:
    """(B * n * n, ch, cw) partial maps, each crop constant at its value."""
    return values.view(-1, 1, 1).expand(-1, *grid.crop_size).clone()


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("size,crop,n", GEOMETRIES)
def test_a_constant_partial_map_folds_to_that_constant(blend, size, crop, n):
    torch.manual_seed(0)
    grid = CropGrid(*size, crop=crop, n=n)
    levels = torch.tensor([3.7, -0.25])  # one constant per image of a batch of two
    partial = per_crop_constants(grid, levels.repeat_interleave(grid.num_crops))
    folded = blend_fold(grid, partial, blend)
    assert folded.shape == (2, 1, *size)
    assert torch.allclose(folded, levels.view(2, 1, 1, 1).expand_as(folded), rtol=1e-5, atol=0)


@pytest.mark.parametrize("size,crop,n", GEOMETRIES)
@pytest.mark.parametrize("fraction", [SIGMA_FRACTION, 0.125, 0.1])
def test_the_folded_window_is_positive_everywhere(size, crop, n, fraction):
    grid = CropGrid(*size, crop=crop, n=n)
    window = gaussian_window(grid.crop_size, fraction)
    total = window_sum(grid, window)
    assert total.shape == (1, 1, *size)
    assert bool((total > 0).all()) and bool(torch.isfinite(total).all())
    # a corner pixel is the corner of every crop covering it (one crop unless the crops coincide)
    assert torch.allclose(total[0, 0, 0, 0], grid.duplication()[0, 0, 0, 0] * window[0, 0])


def test_a_window_that_underflows_is_refused():
    with pytest.raises(ValueError, match="too small"):
        gaussian_window((124, 124), 0.02)
    with pytest.raises(ValueError):
        gaussian_window((124, 124), 0.0)


@pytest.mark.parametrize("size,crop,n", GEOMETRIES)
def test_the_constant_blend_is_the_papers_fold_exactly(size, crop, n):
    torch.manual_seed(1)
    grid = CropGrid(*size, crop=crop, n=n)
    partial = torch.randn(3 * grid.num_crops, *grid.crop_size)
    assert torch.equal(blend_fold(grid, partial), grid.fold(partial) / grid.duplication())
    assert torch.equal(blend_fold(grid, partial, "constant", gamma_offset=1),
                       grid.fold(partial) / (grid.duplication() + 1))
    if 0 < grid.stride[0] < grid.crop_size[0] // 2:  # crops overlapping much: the two blends differ
        assert not torch.allclose(blend_fold(grid, partial, "gaussian"), blend_fold(grid, partial), atol=1e-3)


def spy_on_the_fold(monkeypatch):
    """Record the partial maps UCAG hands to its fold."""
    seen = []

    def spy(grid, partial, *args, **kwargs):
        seen.append((grid, partial.clone()))
        return blend_fold(grid, partial, *args, **kwargs)

    monkeypatch.setattr(protocol_module, "blend_fold", spy)
    return seen


def random_logits(crops):
    return torch.randn(crops.shape[0], 2)


def test_ucag_default_is_the_constant_fold_exactly(monkeypatch):
    """UCAG's map by default is today's formula sum / Gamma over its confidence-weighted partial maps."""
    seen = spy_on_the_fold(monkeypatch)
    torch.manual_seed(2)
    x = torch.rand(2, 3, 40, 52)
    ucag = make_ucag(PatchStub(random_logits, map_size=(5, 4)), crop=150, n=3, alpha=1.5)
    assert ucag.blend == "constant" and "blend='constant'" in repr(ucag)
    maps = ucag(x, [0, 1]).maps
    (grid, partial), = seen
    assert torch.equal(maps, grid.fold(partial) / grid.duplication())


def test_explain_blends_folds_one_set_of_crops_each_way():
    torch.manual_seed(3)
    x = torch.rand(1, 3, 48, 48)
    stub = PatchStub(lambda crops: torch.zeros(crops.shape[0], 2) + crops.mean(dim=(1, 2, 3))[:, None],
                     map_size=(6, 6))
    ucag = make_ucag(stub, crop=124, n=4, alpha=1.2)
    both = ucag.explain_blends(x, [1], ("constant", "gaussian"))
    explained = sum(shape[0] for shape, _ in stub.seen)
    assert torch.equal(both["constant"].maps, ucag(x, [1]).maps)
    gaussian = make_ucag(stub, crop=124, n=4, alpha=1.2, blend="gaussian")
    assert "blend='gaussian'" in repr(gaussian)
    assert torch.equal(both["gaussian"].maps, gaussian(x, [1]).maps)
    assert not torch.allclose(both["gaussian"].maps, both["constant"].maps)
    assert explained == 16  # the 4 x 4 crops were explained once for both blends


def test_the_gaussian_window_is_separable_symmetric_and_peaks_at_the_centre():
    for shape in [(125, 99), (124, 124), (7, 30)]:
        window = gaussian_window(shape).double()
        assert torch.equal(window, window.flip(0)) and torch.equal(window, window.flip(1))
        rows, cols = shape
        centre = ((rows - 1) // 2, (cols - 1) // 2)
        assert window[centre] == window.max()
        separable = torch.outer(window[:, centre[1]], window[centre[0], :]) / window[centre]
        assert torch.allclose(window, separable, rtol=1e-6)
        # strictly falling away from the centre along each axis, with sigma = SIGMA_FRACTION of the side
        assert bool((window[:centre[0] + 1, centre[1]].diff() > 0).all())
        offsets = torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2
        expected = torch.exp(-offsets.square() / (2 * (SIGMA_FRACTION * cols) ** 2))
        assert torch.allclose(window[centre[0], :] / window[centre[0], :].max(), expected / expected.max(), rtol=1e-5)
    assert gaussian_window((125, 125))[62, 62] == 1.0


def max_neighbour_jump(maps: torch.Tensor) -> float:
    return max(float(maps.diff(dim=-1).abs().max()), float(maps.diff(dim=-2).abs().max()))


@pytest.mark.parametrize("size,crop,n,bound", [((224, 224), 124, 6, 0.15), ((230, 301), 124, 6, 0.15),
                                               ((123, 77), 100, 5, 0.6)])
def test_the_gaussian_blend_has_no_seams_where_crops_start_or_end(size, crop, n, bound):
    """Crops of random constant maps: the constant fold steps at every crop edge, the gaussian one hardly
    (a uniform window would make both folds the same). With the paper's stride (20 px, sigma 15.5 px) the
    largest step is a small fraction of the constant fold's; with far-apart crops (stride 17 px, sigma
    6.75 px) the Gaussian transitions between crop centres are steeper, still well below."""
    torch.manual_seed(4)
    grid = CropGrid(*size, crop=crop, n=n)
    for _ in range(5):
        partial = per_crop_constants(grid, torch.rand(grid.num_crops))
        constant = max_neighbour_jump(blend_fold(grid, partial, "constant"))
        gaussian = max_neighbour_jump(blend_fold(grid, partial, "gaussian"))
        assert gaussian < bound * constant, (gaussian, constant)


def test_bad_blends_are_refused():
    stub = PatchStub(random_logits)
    with pytest.raises(ValueError, match="blend must be one of constant, gaussian, got"):
        UCAG(stub, blend="cubic")
    with pytest.raises(ValueError, match="official"):
        UCAG(stub, official=True, blend="gaussian")
    official = make_ucag(stub, official=True, crop=112, n=3, alpha=1.0)
    with pytest.raises(ValueError, match="official"):
        official.explain_blends(torch.rand(1, 3, 16, 16), [1], ("constant", "gaussian"))
    with pytest.raises(ValueError, match="blend must be one of constant, gaussian, got"):
        blend_fold(CropGrid(16, 16, crop=112, n=3), torch.zeros(9, 8, 8), "median")


# ---- the flag, the run identity, visualization's default --------------------------------------------------

def test_official_with_gaussian_blend_is_one_line_error(tmp_path, capsys):
    argv = ["gradcam", "--ucag", "--official", "--blend", "gaussian", "--workers", "0", "--device", "cpu"]
    code, _, err = run(insdel, argv + ["--img-path", str(EXAMPLES), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    one_line_error(err, "--blend gaussian", "--official")
    code, _, err = run_visualization(argv + ["--out", str(tmp_path / "v")], capsys)
    assert code == 2 and "--blend gaussian" in err and "Traceback" not in err


def test_blend_is_part_of_the_run_identity_and_old_runs_resume_as_constant(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", "--ucag", *QUICK, *STEP, "--img-path", str(EXAMPLES / "coffee.jpg"), "--out", str(out)]
    assert run(insdel, argv, capsys)[0] == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["blend"] == "constant"  # the evaluation default is the paper's fold
    code, _, err = run(insdel, argv + ["--blend", "gaussian"], capsys)
    assert code == 2
    one_line_error(err, "blend: 'constant' -> 'gaussian'")
    assert run(insdel, argv + ["--blend", "constant"], capsys)[0] == 0  # explicit = default
    # a run.json written before --blend existed: resumes under the constant fold, refused under gaussian
    del recorded["blend"]
    (out / "run.json").write_text(json.dumps(recorded))
    code, stdout, err = run(insdel, argv, capsys)
    assert code == 0, err
    code, _, err = run(insdel, argv + ["--blend", "gaussian"], capsys)
    assert code == 2
    one_line_error(err, "blend: 'constant' -> 'gaussian'")
    assert "blend" not in json.loads((out / "run.json").read_text())  # the old record is left as it was
    # a gaussian run records its blend and keeps apart from constant ones
    other = tmp_path / "other"
    argv[-1] = str(other)
    assert run(insdel, argv + ["--blend", "gaussian"], capsys)[0] == 0
    assert json.loads((other / "run.json").read_text())["blend"] == "gaussian"
    code, _, err = run(insdel, argv, capsys)
    assert code == 2 and "blend: 'gaussian' -> 'constant'" in err


def test_store_implies_the_constant_blend_only_for_runs_that_predate_it(tmp_path):
    store = ResultStore(tmp_path / "out")
    store.check_config({"ucag": True, "alpha": 2.6}, True)  # an old UCAG run
    store.check_config({"ucag": True, "alpha": 2.6, "blend": "constant"}, True)
    with pytest.raises(store_module.StoreError, match="blend: 'constant' -> 'gaussian'"):
        store.check_config({"ucag": True, "alpha": 2.6, "blend": "gaussian"}, True)
    plain = ResultStore(tmp_path / "plain")
    plain.check_config({"ucag": False}, True)
    plain.check_config({"ucag": False}, True)  # no blend on either side: nothing implied


def capture_panels(monkeypatch):
    saved = []
    original = visualization.save_panels

    def spy(path, panels, header=""):
        saved.append(panels)
        original(path, panels, header)

    monkeypatch.setattr(visualization, "save_panels", spy)
    return saved


def test_visualization_shows_the_gaussian_blend_and_saves_the_papers_map(tmp_path, capsys, monkeypatch, lite):
    saved = capture_panels(monkeypatch)
    image = EXAMPLES / "chelsea.jpg"
    geometry = ["-n", "3", "-a", "1.3"]
    code, _, err = run_visualization(["gradcam", "--ucag", *geometry, "--img-path", str(image), "--out",
                                      str(tmp_path), "--device", "cpu", "--memory-format", "contiguous"], capsys)
    assert code == 0, err  # contiguous: the reference below uses the same layout as the run, to the last bit
    (panels,) = saved
    assert panels[2][1] == "gradcam + UCAG (a=1.3, c=124, n=3, blend: gaussian)"
    rgb = load_rgb(image)
    x = preprocess([rgb], lite, "cpu")
    explainer = build_explainer("gradcam", lite)
    constant = UCAG(explainer, n=3, alpha=1.3)
    gaussian = UCAG(explainer, n=3, alpha=1.3, blend="gaussian")
    paper = constant.finalize(constant(x).maps, rgb.shape[:2])[0, 0].numpy()
    seamless = gaussian.finalize(gaussian(x).maps, rgb.shape[:2])[0, 0].numpy()
    saved_map = np.load(tmp_path / "chelsea_gradcam_ucag.npy")
    assert np.allclose(saved_map, paper, atol=1e-4)  # the data stay the paper's
    assert not np.allclose(saved_map, seamless, atol=1e-2)
    shown = panels[2][0].astype(int)
    assert np.abs(shown - overlay(rgb, seamless).astype(int)).max() <= 1  # the picture is the gaussian map
    assert np.abs(shown - overlay(rgb, paper).astype(int)).max() > 10
    # an explicit --blend is used for both
    saved.clear()
    code, _, err = run_visualization(["gradcam", "--ucag", *geometry, "--blend", "constant", "--img-path",
                                      str(image), "--out", str(tmp_path / "c"), "--device", "cpu"], capsys)
    assert code == 0, err
    (panels,) = saved
    assert panels[2][1].endswith("blend: constant)")
    saved_map = np.load(tmp_path / "c" / "chelsea_gradcam_ucag.npy")
    assert np.allclose(saved_map, paper, atol=1e-4)
    assert np.abs(panels[2][0].astype(int) - overlay(rgb, saved_map).astype(int)).max() <= 1
    # and the official mode shows its own (constant) fold without being asked
    saved.clear()
    code, _, err = run_visualization(["gradcam", "--ucag", *geometry, "--official", "--img-path", str(image),
                                      "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert saved[0][2][1].endswith("blend: constant)")


def test_blend_without_ucag_warns(tmp_path):
    with pytest.warns(UserWarning, match="--blend has no effect without --ucag"):
        code = visualization.main(["gradcam", "--blend", "gaussian", "-n", "3", "--workers", "0", "--img-path",
                                   str(EXAMPLES / "coffee.jpg"), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
