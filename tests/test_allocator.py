"""keep_freed_memory: after it, repeated forwards reuse their freed activation buffers instead of faulting
fresh pages in from the OS on every batch (what made CPU runs spend as long in the kernel as in PyTorch)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROBE = """
import resource, sys
sys.path.insert(0, {repo!r})
import torch
from common.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory())
    assert keep_freed_memory() is keep_freed_memory()  # configured once per process
else:
    print("default")
torch.manual_seed(0)
torch.set_num_threads(1)
nn = torch.nn
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                    nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
x = torch.randn(4, 3, 128, 128)  # 8 MiB activations: above glibc's default mmap threshold
with torch.no_grad():
    for _ in range(3):  # warm-up: the allocator's heap grows to the working set
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env) -> tuple[str, int]:
    """(what keep_freed_memory said, minor page faults of three warm forwards) in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO)), mode], capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    state, faults = result.stdout.strip().splitlines()[-2:]
    return state, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_warm_forwards_stop_faulting_pages_in():
    _, default = page_faults("default")
    state, kept = page_faults("keep")
    assert state.startswith("glibc ") and "kept in the process" in state
    buffer_pages = 4 * 32 * 128 * 128 * 4 // 4096  # one 8 MiB activation
    assert default > 3 * buffer_pages  # glibc gives the buffers back and faults them in again each forward
    # kept: the freed buffers are reused (a stray one-off allocation may still fault a few MiB in)
    assert kept <= 2 * buffer_pages and kept * 8 < default, (kept, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_opt_out_leaves_malloc_alone():
    state, faults = page_faults("keep", UCAG_SYSTEM_MALLOC="1")
    assert state == "unchanged (UCAG_SYSTEM_MALLOC is set)"
    assert faults > 3 * (4 * 32 * 128 * 128 * 4 // 4096)
