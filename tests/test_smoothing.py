"""Smoothing wrappers (methods/smoothing.py): SmoothGrad noise and test-time augmentation, alone and composed
with UCAG both ways; SmoothGrad over `gradient` against Captum's NoiseTunnel with the same noise."""
import pytest
import torch
from captum.attr import NoiseTunnel, Saliency

from methods import build_explainer
from methods.errors import MethodError
from methods.smoothing import FlipScaleSmooth, NoiseSmooth, parse_smooth, smoothed
from ucag import UCAG


@pytest.fixture(scope="module")
def two(photo_batch):
    return photo_batch[:2]


def test_one_sample_without_noise_is_the_method(lite, two):
    method = build_explainer("gradcam", lite)
    plain = method(two, [1, 2])
    smooth = NoiseSmooth(method, 1, 0.0)(two, [1, 2])
    assert torch.equal(plain.maps, smooth.maps) and torch.equal(plain.logits, smooth.logits)


def test_seeded_noise_gives_one_map_per_image_at_any_batch_and_chunk(lite, two):
    smooth = NoiseSmooth(build_explainer("gradient", lite), 4, 0.15, seed=3)
    together = smooth(two, [281, 967]).maps
    alone = smooth(two[1:], [967]).maps
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-6)
    one_by_one = NoiseSmooth(build_explainer("gradient", lite), 4, 0.15, seed=3, sample_batch=1)(two, [281, 967])
    torch.testing.assert_close(together, one_by_one.maps, rtol=1e-5, atol=1e-6)
    other_seed = NoiseSmooth(build_explainer("gradient", lite), 4, 0.15, seed=4)(two, [281, 967]).maps
    assert not torch.allclose(together, other_seed)
    assert not torch.allclose(together, build_explainer("gradient", lite)(two, [281, 967]).maps)


class MaxAbsSaliency(Saliency):
    """Captum's Saliency reduced as our `gradient`: max over colour channels of |d S / d x|."""

    def attribute(self, inputs, target=None, **kwargs):
        return super().attribute(inputs, target=target, abs=True).amax(dim=1, keepdim=True)

    attribute.__wrapped__ = attribute  # NoiseTunnel calls attribute.__wrapped__ (Captum's usage-log decorator)


def test_smoothgrad_equals_captum_noise_tunnel(lite, two):
    """Captum draws its noise with torch.normal from the global generator, std ``stdevs`` absolute; ours is
    SIGMA x the image's range from a seeded generator: the same numbers for one image under the same seed."""
    image, target, sigma, samples = two[:1], 281, 0.2, 5
    ours = NoiseSmooth(build_explainer("gradient", lite), samples, sigma, seed=11)(image, [target]).maps
    spread = float(image.max() - image.min())
    torch.manual_seed(11)
    peer = NoiseTunnel(MaxAbsSaliency(lite.model)).attribute(image, nt_type="smoothgrad", nt_samples=samples,
                                                            stdevs=sigma * spread, target=target)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-7)


def test_ucag_over_smoothing_and_smoothing_over_ucag(lite, two):
    method = build_explainer("gradcam", lite)
    inner = UCAG(NoiseSmooth(method, 2, 0.1), crop=180, n=2, alpha=1.0)(two, [281, 967]).maps
    outer = NoiseSmooth(UCAG(method, crop=180, n=2, alpha=1.0), 2, 0.1)(two, [281, 967]).maps
    plain = UCAG(method, crop=180, n=2, alpha=1.0)(two, [281, 967]).maps
    assert inner.shape == outer.shape == plain.shape
    assert not torch.allclose(inner, plain) and not torch.allclose(outer, plain) and not torch.allclose(inner, outer)
    same = UCAG(NoiseSmooth(method, 1, 0.0), crop=180, n=2, alpha=1.0)(two, [281, 967]).maps
    assert torch.equal(same, plain)


def test_tta_maps_are_mapped_back(lite, two):
    method = build_explainer("gradcam", lite)
    plain = method(two, [281, 967]).maps
    assert torch.equal(FlipScaleSmooth(method, "none", (1.0,))(two, [281, 967]).maps, plain)
    flipped = method(two.flip(3), [281, 967]).maps.flip(3)
    torch.testing.assert_close(FlipScaleSmooth(method, "h", (1.0,))(two, [281, 967]).maps, (plain + flipped) / 2)
    scaled = FlipScaleSmooth(method, "none", (1.0, 1.5))(two, [281, 967]).maps
    assert scaled.shape == plain.shape and not torch.allclose(scaled, plain)


@pytest.mark.parametrize("text, message", [
    ("noise:0,0.1", "samples must be a positive integer"), ("noise:4,-1", "sigma must be a finite number"),
    ("noise:4", "--smooth must be noise:N,SIGMA"), ("blur:3", "--smooth must be"), ("tta:x,1", "flips must be"),
    ("tta:h,0", "scales must be finite numbers > 0"), ("noise:4,nan", "sigma must be a finite number"),
])
def test_bad_specs(lite, text, message):
    with pytest.raises(MethodError, match=message.replace("(", r"\(")):
        smoothed(build_explainer("gradcam", lite), text)


def test_parse():
    assert parse_smooth("noise:16,0.15") == ("noise", (16, 0.15))
    assert parse_smooth("tta:hv,1/1.25") == ("tta", ("hv", (1.0, 1.25)))


def test_the_flag_in_a_script(tmp_path, capsys):
    import json

    import confidence
    from tests.conftest import EXAMPLES
    from tests.test_eval_scripts import FAST, run
    base = ["gradcam", *FAST, "--img-path", str(EXAMPLES), "--limit", "2"]
    assert run(confidence, [*base, "--out", str(tmp_path / "plain")], capsys)[0] == 0
    code, _, err = run(confidence, [*base, "--out", str(tmp_path / "same"), "--smooth", "noise:1,0"], capsys)
    assert code == 0, err
    assert (tmp_path / "same" / "per_image.csv").read_text() == (tmp_path / "plain" / "per_image.csv").read_text()
    identity = json.loads((tmp_path / "same" / "run.json").read_text())
    assert identity["smooth"] == "noise:1,0" and identity["smooth_seed"] == 0
    code, _, err = run(confidence, [*base, "--out", str(tmp_path / "bad"), "--smooth", "noise:4"], capsys)
    assert code != 0 and "--smooth must be noise:N,SIGMA" in err and "Traceback" not in err
