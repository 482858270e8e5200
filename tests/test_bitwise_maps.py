"""Issue 21's guard: every registered method's maps, with and without UCAG (``--official`` included), built
from the scripts' flags, are bit for bit the ones recorded before its refactorings (tests/bitwise_maps.py)."""
import json
import math
import warnings

import pytest

from methods import available_methods
from tests import bitwise_maps

RECORDED = json.loads(bitwise_maps.FIXTURE.read_text())


def test_the_fixture_covers_the_whole_registry():
    methods = {key.split("/")[0] for key in RECORDED["maps"]}
    assert methods == set(available_methods())


@pytest.mark.parametrize("method", available_methods())
def test_maps_are_bitwise_unchanged(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        computed = {key: bitwise_maps.fingerprint(value) for key, value in bitwise_maps.compute([method]).items()}
    recorded = {key: value for key, value in RECORDED["maps"].items() if key.split("/")[0] == method}
    assert sorted(computed) == sorted(recorded)
    same_platform = RECORDED["platform"] == bitwise_maps.platform()
    for key, now in computed.items():
        before = recorded[key]
        assert (now["shape"], now["dtype"]) == (before["shape"], before["dtype"]), key
        if same_platform:  # the bits
            assert now["sha256"] == before["sha256"], (key, now, before)
        else:  # another PyTorch build or CPU: its kernels may round differently, the values must still agree
            scale = max(before["absmax"], 1e-30)
            assert math.isclose(now["sum"], before["sum"], rel_tol=1e-4, abs_tol=1e-4 * scale * math.prod(now["shape"]))
            assert math.isclose(now["absmax"], before["absmax"], rel_tol=1e-4), key
