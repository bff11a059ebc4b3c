#!/usr/bin/env bash
# Every speed figure of the README in one run (see benchmarks/gpu_suite.py). Full: one GPU, ~8 minutes.
# --smoke: tiny architectures on the CPU in seconds (CI). Needs the package installed (pip install -e .).
# Then the vLLM cell (LLaVA-1.5-7B, random weights, 576 -> 64 visual tokens per image: stock vLLM against the
# learnpruner plugin, time to first token and requests per second), run by the Python in VLLM_PYTHON (default:
# python) when vLLM imports there (pip install -e ".[vllm]" in an environment of its own); skipped otherwise.
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
else
    echo "vLLM cell skipped: $([[ $smoke == 1 ]] && echo "--smoke" || echo "vLLM does not import in $vpy")"
fi
