#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): device tests, resnet50 speed in fp32/tf32/bf16, torchrun with two
# processes on one GPU, --deterministic; one table, under 8 minutes. --cpu-smoke runs it on a CPU.
#   benchmarks/gpu_check.sh --pack                   # here, once: the embedded model's packages into .whl/site
#   benchmarks/gpu_check.sh --out "$OUT/gpu_check"   # on the GPU machine, with .whl carried
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl/site ]; then
    export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
