#!/usr/bin/env bash
# Issue 27's comparison on shapes-tiny-full: every method at 192/128/64/32 on shapesvqa:test-large (6000 items), then
# the paper convention for the peers whose papers use another one, then LearnPruner at those configurations'
# average token counts. Resumable: rerun the same command to continue
# (the folder keeps every answered item). About 5 CPU-hours at one thread. OUT defaults to runs/tl-full.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/tl-full}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
methods=none,learnpruner,lpm-only,cls-text,cls-only,lpm-lpm,text-only,divprune,cdpruner,vispruner,visionzip,dart,fastv,pyramiddrop,sparsevlm,random
learnpruner eval --model shapes-tiny-full --data shapesvqa:test-large --methods "$methods" --tokens 192,128,64,32 \
    --batch-size 64 --out "$out"
learnpruner eval --model shapes-tiny-full --data shapesvqa:test-large --methods none,fastv,dart,pyramiddrop,sparsevlm \
    --tokens 192,128,64,32 --budget paper --batch-size 64 --out "$out"
# LearnPruner at the average tokens per layer that FastV's and DART's paper configurations keep (compute-matched)
learnpruner eval --model shapes-tiny-full --data shapesvqa:test-large --methods learnpruner \
    --tokens 288,244,240,188,168,132,104 --batch-size 64 --out "$out"
learnpruner compare learnpruner --out "$out" --json "$out/paired.json"
learnpruner compare learnpruner --out "$out" --budget paper --json "$out/paired-paper.json"
