#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): device tests, resnet50 speed in fp32/tf32/bf16, torchrun with two
# processes on one GPU, --deterministic; one table, under 8 minutes. --cpu-smoke runs it on a CPU.
#   benchmarks/gpu_check.sh --out "$OUT/gpu_check"
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
