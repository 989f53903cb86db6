#!/usr/bin/env bash
# The SmolLM2-135M-Instruct characterisation sweep recorded in this folder.
# Three sweeps into one resumable store (rerun to continue after an interruption).
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE="$(cd "$(dirname "$0")" && pwd)"
M="$(lm-eval-lowrank fetch-model)"
COMMON=(--model "$M" --tasks arc_easy_local,lambada_openai_local --limit 16 --batch-size 16 --store "$HERE/sweep.jsonl")
# rank 1, whole layers: single layers at both ends and the middle, and the Table 4 sets
lm-eval-lowrank sweep "${COMMON[@]}" --ranks 1 --layer-sets 'single:3|16|30;table4' --tensor-groups all
# rank 1, one tensor in every layer (per-tensor sensitivity)
lm-eval-lowrank sweep "${COMMON[@]}" --ranks 1 --layer-sets all --tensor-groups single
# rank 8, the same single layers
lm-eval-lowrank sweep "${COMMON[@]}" --ranks 8 --layer-sets 'single:3|16|30' --tensor-groups all
lm-eval-lowrank report "$HERE/sweep.jsonl" --out "$HERE"
