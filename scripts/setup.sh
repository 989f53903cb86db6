#!/usr/bin/env bash
# Create .venv (once) and install the package with its dev extras, offline-friendly.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VENV=${LM_EVAL_LOWRANK_VENV:-.venv}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
STAMP="$VENV/.lm-eval-lowrank-installed"
HASH=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  say "installing torch (CPU build) $(grep '^torch==' constraints.txt)"
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' constraints.txt)"
  say "installing lm-eval-lowrank and its dev extras (lm-eval, transformers, peft, gguf, ...)"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev,energy]'
  echo "$HASH" > "$STAMP"
else
  say "environment $VENV is up to date"
fi
