#!/usr/bin/env bash
# Definition-1 search over activation-aware candidates on SmolLM2-135M-Instruct (CPU).
# Candidates: whitened SVD keeping 70 % of each chosen whole layer, on the middle layer or on every
# third layer of the allowed band (3, 6, ..., 27). (A first run also had keep 0.5 and two spread
# layers; it was cut to fit the session's time, its rows stay in the store.) Calibration is the
# held-out wikitext documents (never scored here). Resumable: rerun to continue.
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE="$(cd "$(dirname "$0")" && pwd)"
M="$(lm-eval-lowrank fetch-model)"
lm-eval-lowrank search --model "$M" --tasks arc_easy_local,lambada_openai_local \
  --method whiten --keeps 0.7 --ranks none --max-k 1 --strides 3 --no-table4 \
  --model-args 'calib=wikitext_local,calib_n=128,calib_len=128' \
  --tolerance "${TOL:-0.05}" --objective "${OBJ:-params}" --limits 40,120 --eta 2 --prune-margin 0.15 \
  --batch-size 16 --store "$HERE/search.jsonl"
