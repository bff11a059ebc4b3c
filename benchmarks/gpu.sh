#!/usr/bin/env bash
# Every speed figure of the README in one run (see benchmarks/gpu_suite.py). Full: one GPU, ~8 minutes.
# --smoke: tiny architectures on the CPU in seconds (CI). Needs the package installed (pip install -e .).
# Then the vLLM cells (random weights; stock vLLM against the learnpruner plugin, time to first token and requests
# per second): LLaVA-1.5-7B, 576 -> 64 visual tokens per image, and Qwen2.5-VL-7B, 1280 -> 142 per 896x1120 image.
# They run with the Python in VLLM_PYTHON (default: python) when vLLM imports there (pip install -e ".[vllm]" in
# an environment of its own); skipped otherwise.
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
vpy="${VLLM_PYTHON:-python}"
if [[ $smoke == 0 ]] && "$vpy" -c "import vllm" 2>/dev/null; then
    "$vpy" -m learnpruner.cli vllm-bench --arch llava-1.5-7b --methods none,learnpruner,divprune --tokens 64 \
        --requests 64 --new-tokens 16 --repeats 10 --out "${out:-learnpruner-gpu}/vllm"
    "$vpy" -m learnpruner.cli vllm-bench --arch qwen2.5-vl-7b --methods none,learnpruner,divprune --tokens 142 \
        --requests 64 --new-tokens 16 --repeats 10 --out "${out:-learnpruner-gpu}/vllm-qwen"
else
    echo "vLLM cell skipped: $([[ $smoke == 1 ]] && echo "--smoke" || echo "vLLM does not import in $vpy")"
fi
