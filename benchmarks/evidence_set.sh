#!/usr/bin/env bash
# Issue 38's evidence on shapes-tiny-full, shapesvqa:test-large (6000 items, never used to choose anything):
# learnpruner-set against the stage-1 peers, learnpruner, lpm-only and none at 64 and 32 tokens; then the other
# 2026 and diversity peers on the first 2000 items (a folder of its own: cells of different items are never
# paired), and learnpruner-set against DivPrune at 192 and 128 tokens on all 6000 (a third folder), and shapes-tiny at 64
# and 32 (a fourth). Resumable: rerun
# to continue. OUT defaults to runs/set-evidence.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/set-evidence}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
learnpruner eval --model shapes-tiny-full --data shapesvqa:test-large --batch-size 32 --tokens 64,32 \
    --methods none,divprune,learnpruner,lpm-only,learnpruner-set --out "$out/full"
learnpruner eval --model shapes-tiny-full --data shapesvqa:test-large --limit 2000 --batch-size 32 --tokens 64,32 \
    --methods learnpruner-set,divprune,cdpruner,vispruner,scope,mmr --out "$out/first-2000"
learnpruner eval --model shapes-tiny-full --data shapesvqa:test-large --batch-size 32 --tokens 192,128 \
    --methods learnpruner-set,divprune --out "$out/high-budgets"
learnpruner eval --model shapes-tiny --data shapesvqa:test-large --batch-size 32 --tokens 64,32 \
    --methods none,learnpruner-set,divprune,learnpruner --out "$out/shapes-tiny"
learnpruner compare learnpruner-set --out "$out/full" --json "$out/full-paired.json"
learnpruner compare learnpruner-set --out "$out/shapes-tiny" --json "$out/shapes-tiny-paired.json"
learnpruner compare learnpruner-set --out "$out/high-budgets" --json "$out/high-budgets-paired.json"
learnpruner compare learnpruner-set --out "$out/first-2000" --json "$out/first-2000-paired.json"
