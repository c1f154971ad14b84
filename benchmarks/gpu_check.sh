#!/usr/bin/env bash
# benchmarks/gpu_check.sh [--out-md FILE] [--repeats N]: on a machine with a CUDA GPU, run
# the test suite's CUDA-only tests (pytest -m cuda) and a short CUDA benchmark (norm
# layers against cuDNN BN, the toy training iteration per norm), and write a markdown
# report, by default docs/gpu_check_results.md, that also lists what could not run. About
# 5 minutes on one GPU, no network (benchmarks/gpu_check.py). Without a GPU: one line
# saying so, exit 0. PYTHON: the interpreter (default: the repository's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m benchmarks.gpu_check "$@"
