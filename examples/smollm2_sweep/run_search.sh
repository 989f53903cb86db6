#!/usr/bin/env bash
# A small Definition-1 search on SmolLM2-135M-Instruct (CPU, contended: tiny limits).
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE="$(cd "$(dirname "$0")" && pwd)"
M="$(lm-eval-lowrank fetch-model)"
lm-eval-lowrank search --model "$M" --tasks arc_easy_local,lambada_openai_local \
  --tolerance 0.03 --objective 'latency*energy' --ranks 1 --max-k 2 --no-table4 \
  --limits 4,12 --eta 2 --prune-margin 0.25 --batch-size 16 --store "$HERE/search.jsonl"
