#!/usr/bin/env bash
# One Definition-1 search that compares three methods on SmolLM2-135M-Instruct (CPU), with the
# statistics: plain SVD (tucker), activation-scaled SVD (asvd) and whitened SVD (whiten), each keeping
# 70 % or 50 % of each chosen whole layer, on the middle layer or on every third layer of the allowed
# band (3, 6, ..., 27). Screening on 30 documents per task prunes only a candidate whose paired lower
# bound is beyond tau; the last rung (150 documents) calls a candidate feasible only when its paired
# upper bound is within tau, family-wise over the rung's candidates. Calibration: 32 x 128 tokens of
# held-out wikitext (never scored here). Resumable: rerun to continue.
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HERE="$(cd "$(dirname "$0")" && pwd)"
M="$(lm-eval-lowrank fetch-model)"
lm-eval-lowrank search --model "$M" --tasks arc_easy_local,lambada_openai_local \
  --method tucker,asvd,whiten --keeps 0.7,0.5 --ranks none --max-k 1 --strides 3 --no-table4 \
  --model-args 'dtype=float32,calib=wikitext_local,calib_n=32,calib_len=128' \
  --tolerance "${TOL:-0.05}" --objective "${OBJ:-params}" --limits 30,150 --eta 3 \
  --confidence 0.9 --family-wise --batch-size 16 --store "$HERE/search.jsonl"
