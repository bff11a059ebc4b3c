#!/usr/bin/env bash
# Every speed figure of the README in one run (see benchmarks/gpu_suite.py). Full: one GPU, ~8 minutes.
# --smoke: tiny architectures on the CPU in seconds (CI). Needs the package installed (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_suite.py "$@"
