#!/usr/bin/env bash
# The GPU checklist of benchmarks/README.md, in stages that each fit the device tool's 10-minute command.
#
# Here (needs PyPI), once per session:
#   bash benchmarks/gpu_checklist.sh prepare
# builds .whl/ (this package, lm-eval and the lm-eval dependencies the GPU image lacks) and .devcarry/
# (the SmolLM2 tokenizer, the ARC-Easy and wikitext files). Both are git-ignored through .git/info/exclude.
# There, one device call per stage, in order of priority (30 device minutes fit about three):
#   run(command="bash benchmarks/gpu_checklist.sh 1", carry=[".whl", ".devcarry"], timeout_s=600)
# Each stage prints its figures and keeps its log in $OUT/stageN.log.
#
#   1  decompose-on-load / load at 7B shapes (rank 1, 64); randomized vs exact on the GPU
#   2  forward latency cut / parameter cut at 7B shapes; rom's solve with weights on the GPU
#   3  the real harness at 7B shapes: latency, energy per token (NVML), memory, dense vs decomposed
#   4  cache-hit and checkpoint loads at 7B shapes; rom, whiten, asvd, fwsvd and fwhiten through lm_eval on the GPU,
#      and allocator=fisher (its curves on the GPU)
#   5  experts blocks (Mixtral-8x7B, Qwen3-30B-A3B shapes; prefill and decoding): decomposed experts against
#      transformers' grouped_mm, bf16, and the factored forward's grouped GEMMs against its loop
#   6  decomposing 128 Qwen3-30B-A3B-shaped experts at rank 8 and 64 against their full SVD (one solve per expert:
#      is a batched solve over the experts needed on a GPU?)
#   7  tests/test_cuda.py, the paths only a GPU takes, run for real: the grouped experts GEMMs against the loop
#      (fp32, bf16; greedy decoding), experts offloaded to the CPU and run on the GPU, a checkpoint dispatched over
#      the GPU and the CPU; then the gradient pass batched against one sequence at a time (8 layers of 7B shapes, bf16;
#      the experts of 4 OLMoE-1B-7B-shaped layers, bf16)
#
# GPU_CHECKLIST_SMOKE=1 runs the same commands on this CPU at toy sizes (one layer, a few documents),
# so that a broken argument shows up here and not in device minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage="${1:?usage: gpu_checklist.sh prepare|1|2|3|4|5|6|7}"
smoke="${GPU_CHECKLIST_SMOKE:-0}"
case "$stage" in
prepare | 1 | 2 | 3 | 4 | 5 | 6 | 7) ;;
*)
    echo "unknown stage $stage: prepare, 1, 2, 3, 4, 5, 6 or 7" >&2
    exit 2
    ;;
esac

prepare() {
    set -e
    local py=.venv/bin/python
    local exclude
    exclude="$(git rev-parse --git-path info/exclude)"  # a fresh checkout may have no .git/info yet
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    grep -qx '/.devcarry/' "$exclude" 2>/dev/null || echo '/.devcarry/' >>"$exclude"
    rm -rf .whl && mkdir -p .whl .devcarry/data/arc_easy .devcarry/data/wikitext .devcarry/tok
    "$py" -m pip wheel -q --no-deps -w .whl .
    # lm-eval 0.4.13's dependencies that the GPU image (Python 3.12) does not hold: wheels for 3.12, and
    # three pure-Python sdists built into wheels here
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 pytablewriter==1.2.1 \
        dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 \
        nltk==3.10.4 more_itertools==11.2.1 pytz==2026.6 chardet==7.7.0
    "$py" -m pip wheel -q --no-deps -w .whl rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1
    # stage 7 runs the CUDA tests with the suite's own pytest
    "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0
    local model data
    model="$("$py" -c 'from lm_eval_lowrank.assets import smollm2_path; print(smollm2_path())')"
    data="$("$py" -c 'from lm_eval_lowrank.tasks import data_dir; print(data_dir())')"
    cp "$model"/tokenizer.json "$model"/tokenizer_config.json .devcarry/tok/
    cp "$data"/arc_easy/test.jsonl .devcarry/data/arc_easy/
    cp "$data"/wikitext/test.jsonl .devcarry/data/wikitext/
    du -sh .whl .devcarry
    echo "ready: carry .whl and .devcarry"
}

if [ "$stage" = prepare ]; then
    prepare
    exit
fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
log="$OUT/stage$stage.log"
if [ "$smoke" = 1 ]; then
    dev=cpu
    py=.venv/bin/python
    few_layers=(--layers 1)
    shape=smollm2-135m
    limit=4
    reload_layers=(--synthetic-layers 1)
    moe_shape=(--hidden 128 --inter 256 --tokens 256 --dtype float32)
    moe_many=(--hidden 64 --inter 32 --experts 16 --top-k 4 --tokens 64 --dtype float32)
    moe_ranks=(2 8)
    grad_layers=(--synthetic-layers 1 --n 4)
    moe_grad=(--synthetic-layers 1 --n 2 --len 32)
else
    dev=cuda
    py=python3
    few_layers=()
    shape=llama-2-7b
    limit=500
    reload_layers=()
    moe_shape=(--hidden 4096 --inter 14336 --tokens 8192 --dtype bfloat16)  # Mixtral-8x7B's experts
    moe_many=(--hidden 2048 --inter 768 --experts 128 --top-k 8 --tokens 8192 --dtype bfloat16)  # Qwen3-30B-A3B's
    moe_ranks=(8 64)
    grad_layers=(--synthetic-layers 8 --n 32)
    moe_grad=(--synthetic-layers 4 --n 32)
    # the wheels go into the image's own environment, so lm_eval finds the hf-tucker hook (.pth) and
    # the console scripts; the tree's sources come first, so the code is this checkout's
    $py -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv
fi
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export LM_EVAL_LOWRANK_DATA="$PWD/.devcarry/data"

item() {  # item SECONDS COMMAND...: one figure-producing command, bounded, logged
    local limit_s="$1"
    shift
    [ "$smoke" = 1 ] && [ "$limit_s" -gt 240 ] && limit_s=240  # toy sizes; a slow CPU baseline may be cut short
    echo "### $* (limit ${limit_s}s)" | tee -a "$log"
    local t0=$SECONDS
    timeout "$limit_s" "$@" 2>&1 | grep -v -e 'Loading weights' -e '^\s*$' | tee -a "$log"
    echo "### rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$log"
}

case "$stage" in
1)
    item 400 $py benchmarks/decompose.py --device $dev --synthetic llama-2-7b "${few_layers[@]}" --workdir /tmp/l2 --ranks 1 64 --reps 2
    item 150 $py benchmarks/decompose.py --device $dev --switch-only --reps 2
    ;;
2)
    item 380 $py benchmarks/forward.py --device $dev --synthetic llama-2-7b "${few_layers[@]}" --ranks 64 --cuts 0.1 0.3 --layouts folded --skip-modules --reps 2
    item 180 $py benchmarks/rom.py --device $dev --synthetic-only --reps 1
    ;;
3)
    item 560 $py benchmarks/harness_efficiency.py --shape $shape --device $dev --dtype bfloat16 --limit $limit --batch-size 32 \
        --tokenizer .devcarry/tok --arc-file .devcarry/data/arc_easy/test.jsonl --json-out "$OUT/harness_efficiency.json"
    ;;
4)
    item 380 $py benchmarks/reload.py --synthetic llama-2-7b "${reload_layers[@]}" --device $dev --dtype bfloat16 --rank 16 --repeats 2 --workdir /tmp/rl
    item 200 $py benchmarks/harness_efficiency.py --shape smollm2-135m --device $dev --dtype float32 --limit 20 --batch-size 16 \
        --tokenizer .devcarry/tok --arc-file .devcarry/data/arc_easy/test.jsonl \
        --configs 'method=rom,rank=8,layers=3|15|28' 'method=whiten,rank=8,layers=3|15|28' 'method=asvd,rank=8,layers=3|15|28' 'method=fwsvd,rank=8,layers=3|15|28' 'method=fwhiten,rank=8,layers=3|15|28' \
        'method=whiten,budget=0.95,allocator=fisher'
    ;;
5)
    item 240 $py benchmarks/moe.py --device $dev "${moe_shape[@]}" --cuts 0.1,0.3,0.5 --reps 7
    item 180 $py benchmarks/moe.py --device $dev "${moe_many[@]}" --cuts 0.3,0.5 --reps 7
    item 120 $py benchmarks/moe.py --device $dev "${moe_many[@]}" --tokens 16 --cuts 0.5 --reps 15  # decoding: launch-bound
    ;;
6)
    item 560 $py benchmarks/moe.py --device $dev "${moe_many[@]}" --tokens 16 --cuts 0.5 --reps 3 --decompose-ranks "${moe_ranks[@]}"
    ;;
7)
    item 300 $py -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py  # all skipped on a machine without CUDA
    item 240 $py benchmarks/gradient_pass.py --device $dev --synthetic llama-2-7b "${grad_layers[@]}" --dtype bfloat16 \
        --tokenizer .devcarry/tok --workdir /tmp/gp --batch 2 8 16 --repeats 3
    # what grad_checkpoint=auto counts against what the pass allocated, up to 2048-token sequences
    item 240 $py benchmarks/gradient_pass.py --device $dev --synthetic llama-2-7b "${grad_layers[@]}" --dtype bfloat16 \
        --tokenizer .devcarry/tok --workdir /tmp/gp --len 128 512 2048 --batch 2 8 --repeats 0 --held
    item 240 $py benchmarks/gradient_pass.py --device $dev --synthetic olmoe-1b-7b "${moe_grad[@]}" --dtype bfloat16 \
        --tensors 'experts.gate_up_proj|experts.down_proj' --tokenizer .devcarry/tok --workdir /tmp/gp --batch 2 8 --repeats 3
    ;;
esac
echo "log: $log"
