#!/usr/bin/env bash
# Every speed figure of the README in one run (see benchmarks/gpu_suite.py). Full: one GPU, ~8 minutes.
# --smoke: tiny architectures on the CPU in seconds (CI). Needs the package installed (pip install -e .).
# Then the vLLM cells (random weights; stock vLLM against the learnpruner plugin, time to first token and requests
# per second): LLaVA-1.5-7B, 576 -> 64 visual tokens per image, and Qwen2.5-VL-7B, 1280 -> 142 per 896x1120 image.
# See below for the environment they run in.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_suite.py "$@"
smoke=0; out=""
prev=""
for a in "$@"; do
    [[ "$a" == "--smoke" ]] && smoke=1
    [[ "$prev" == "--out" ]] && out="$a"
    prev="$a"
done
# vLLM pins its own torch and transformers: unless VLLM_PYTHON names a Python where vLLM imports, the cells get a
# virtual environment of their own (VLLM_VENV, default .venv-vllm: pip install -e ".[vllm]", a few minutes once).
# SKIP_VLLM=1 skips them.
vpy="${VLLM_PYTHON:-}"
if [[ $smoke == 0 && "${SKIP_VLLM:-0}" != 1 && -z "$vpy" ]]; then
    venv="${VLLM_VENV:-.venv-vllm}"
    if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
        python -m venv "$venv" && "$venv/bin/python" -m pip install -q -e ".[vllm]" || echo "vLLM install failed"
    fi
    vpy="$venv/bin/python"
fi
if [[ $smoke == 0 && "${SKIP_VLLM:-0}" != 1 ]] && "$vpy" -c "import vllm" 2>/dev/null; then
    "$vpy" -m learnpruner.cli vllm-bench --arch llava-1.5-7b --methods none,learnpruner,divprune --tokens 64 \
        --requests 64 --new-tokens 16 --repeats 10 --out "${out:-learnpruner-gpu}/vllm"
    "$vpy" -m learnpruner.cli vllm-bench --arch qwen2.5-vl-7b --methods none,learnpruner,divprune --tokens 142 \
        --requests 64 --new-tokens 16 --repeats 10 --out "${out:-learnpruner-gpu}/vllm-qwen"
else
    echo "vLLM cells skipped: $([[ $smoke == 1 ]] && echo "--smoke" || echo "SKIP_VLLM=1, or vLLM does not import in ${vpy:-python}")"
fi
