#!/usr/bin/env bash
# The one command for a GPU machine: the GPU test suite, then the benchmarks' GPU modes.
# Runs from the source tree (no install): PYTHONPATH=. as that machine reaches no registry.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 -m gpuvars devices
rc=0
python3 -m pytest -q -m "gpu or multi_gpu" tests/ -rs || rc=1
python3 bench/bench_ops.py --quick || rc=1
python3 bench/bench_checkpoint.py --gpu --quick || rc=1
python3 bench/bench_distribute.py --gpu --quick || rc=1
python3 -m gpuvars demo --steps 100 || rc=1
exit $rc
