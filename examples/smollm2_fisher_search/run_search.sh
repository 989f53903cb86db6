#!/usr/bin/env bash
# Definition-1 search on SmolLM2-135M-Instruct (CPU) over whole-model budgets whose cut allocator=fisher places
# (the K-FAC loss estimate: any layers, any tensors, a rank per module), with whitened SVD. The same tasks,
# tolerance, rungs and calibration as ../smollm2_whiten_search, whose whole-layer candidates found a 0.79 % cut.
# Calibration is the held-out wikitext documents (never scored here). Resumable: rerun to continue.
# LIMITS=100,500 STORE=search_500.jsonl: the same search with rungs of 100 and 500 documents per task.
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE="$(cd "$(dirname "$0")" && pwd)"
M="$(lm-eval-lowrank fetch-model)"
lm-eval-lowrank search --model "$M" --tasks arc_easy_local,lambada_openai_local \
  --method whiten --ranks none --budgets "${BUDGETS:-0.98,0.95,0.92,0.9}" --allocator fisher \
  --model-args 'calib=wikitext_local,calib_n=128,calib_len=128' \
  --tolerance "${TOL:-0.05}" --objective "${OBJ:-params}" --limits "${LIMITS:-40,120}" --eta 2 --prune-margin 0.15 \
  --batch-size 16 --store "$HERE/${STORE:-search.jsonl}"
