"""--deterministic: the switches it sets, bit-identical results of two runs, the run identity and its refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch

import insdel
from app.lifecycle import run_cli
from common.determinism import CUBLAS_VARIABLE, DeterminismError, explain_refusal, make_deterministic
from evaluation.errors import StoreError
from tests.conftest import EXAMPLES

ARGV = ["gradcam", "--img-path", str(EXAMPLES), "--limit", "2", "--device", "cpu", "--workers", "0",
        "--step", str(224 * 56), "--target", "pred", "--batch-size", "2"]


@pytest.fixture
def restored(monkeypatch):
    """Undo the process-wide switches --deterministic sets (the tests run the scripts in this process)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    monkeypatch.delenv(CUBLAS_VARIABLE, raising=False)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def test_make_deterministic_sets_every_switch(restored):
    torch.backends.cudnn.benchmark = True
    make_deterministic()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert os.environ[CUBLAS_VARIABLE] == ":4096:8"


def test_a_nondeterministic_cublas_setting_is_refused(restored, monkeypatch):
    monkeypatch.setenv(CUBLAS_VARIABLE, ":0:0")
    with pytest.raises(DeterminismError, match="CUBLAS_WORKSPACE_CONFIG=:0:0 is set"):
        make_deterministic()
    monkeypatch.setenv(CUBLAS_VARIABLE, ":16:8")  # the other documented setting is kept
    make_deterministic()
    assert os.environ[CUBLAS_VARIABLE] == ":16:8"


def test_an_op_without_a_deterministic_kernel_is_one_line(restored, capsys):
    make_deterministic()

    def main(argv):
        torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))  # no deterministic CPU kernel
        return 0
    with pytest.raises(SystemExit) as stop:
        run_cli(main, [], prog="insdel.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("insdel.py: error: --deterministic: put_ has no deterministic kernel on this "
                                       "device; drop --deterministic, or use another method or model\n")
    assert explain_refusal(RuntimeError("CUDA out of memory")) is None


def test_other_runtime_errors_still_raise(restored):
    def main(argv):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(main, [])


def test_two_deterministic_runs_are_bit_identical_and_recorded(tmp_path, restored):
    first, second = tmp_path / "first", tmp_path / "second"
    assert insdel.main([*ARGV, "--deterministic", "--out", str(first)]) == 0
    assert torch.are_deterministic_algorithms_enabled()
    assert insdel.main([*ARGV, "--deterministic", "--out", str(second)]) == 0
    table = (first / "per_image.csv").read_bytes()
    assert table == (second / "per_image.csv").read_bytes() and table.count(b"\n") == 3  # header + 2 images
    assert json.loads((first / "run.json").read_text())["deterministic"] is True
    torch.use_deterministic_algorithms(False)
    with pytest.raises(StoreError, match="deterministic"):
        insdel.main([*ARGV, "--out", str(first)])  # a resume without the flag is another run


def test_a_run_json_from_before_the_flag_resumes_without_it(tmp_path, restored):
    out = tmp_path / "out"
    assert insdel.main([*ARGV, "--limit", "1", "--out", str(out)]) == 0
    recorded = json.loads((out / "run.json").read_text())
    assert recorded.pop("deterministic") is False
    (out / "run.json").write_text(json.dumps(recorded))  # as written before --deterministic existed
    assert insdel.main([*ARGV, "--limit", "1", "--out", str(out)]) == 0
    with pytest.raises(StoreError, match="deterministic"):
        insdel.main([*ARGV, "--limit", "1", "--deterministic", "--out", str(out)])
