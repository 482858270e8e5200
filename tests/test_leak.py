"""1000 explain calls keep the process's memory flat: nothing an explainer or UCAG makes outlives its call
(a kept graph, an activation cached per call, a hook left registered).

Memory is the heap in use (glibc's mallinfo2: bytes handed out by malloc, whether or not the process keeps
freed memory), not the RSS: in a process that keeps its freed buffers (common.allocator, earlier tests) a
leak is served from kept memory and the RSS does not move."""
from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest
import torch
from torch import nn

from methods import build_explainer
from models.spec import ModelSpec
from ucag import UCAG

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")]

WARM_UP, CALLS = 100, 1000
GROWTH_MIB = 4  # a leak of one 2 x 16 x 60 x 60 activation a call would add 200 MiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mib() -> float:
    """The heap in use now: malloc'ed bytes (uordblks) plus mmapped chunks (hblkhd), from glibc's mallinfo2;
    the resident set size (/proc/self/statm) where mallinfo2 is missing (glibc < 2.33, musl)."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


@pytest.fixture(scope="module")
def tiny() -> ModelSpec:
    """A two-convolution network: each call costs a millisecond, so 1000 of them fit a test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10))
    return ModelSpec("tiny", model.eval(), "3", [str(i) for i in range(10)], input_size=(64, 64), min_side=8)


def explainers(spec: ModelSpec) -> dict:
    gradcam = build_explainer("gradcam", spec)
    return {"gradcam": gradcam, "ucag": UCAG(gradcam, n=2, alpha=1.5)}


@pytest.mark.parametrize("name", ["gradcam", "ucag"])
def test_a_thousand_explain_calls_keep_the_heap_flat(name, tiny):
    explainer = explainers(tiny)[name]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def call():
        maps, _ = explainer(x)
        return explainer.finalize(maps, (64, 64))

    for _ in range(WARM_UP):
        first = call()
    gc.collect()
    before, objects = heap_mib(), len(gc.get_objects())
    for _ in range(CALLS - WARM_UP):
        last = call()
    gc.collect()
    growth = heap_mib() - before
    assert growth < GROWTH_MIB, f"the heap grew {growth:.1f} MiB over {CALLS - WARM_UP} {name} calls"
    assert len(gc.get_objects()) - objects < 100  # no Python object kept per call (a list, a hook handle)
    assert torch.equal(first, last)  # the same map every time: no state carried from call to call
    hooks = [m for m in tiny.model.modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert hooks == [] and all(p.grad is None for p in tiny.model.parameters())


def test_the_check_sees_a_leak(tiny):
    """An explainer that keeps each call's maps: the same measurement fails."""
    explainer, kept = explainers(tiny)["gradcam"], []
    x = torch.randn(2, 3, 64, 64)
    for _ in range(WARM_UP):
        explainer(x)
    before = heap_mib()
    for _ in range(300):
        kept.append(explainer(x).maps.repeat(1, 8, 1, 1))  # 2 x 8 x 60 x 60 floats: 225 KiB a call, 66 MiB in all
    assert heap_mib() - before > GROWTH_MIB
