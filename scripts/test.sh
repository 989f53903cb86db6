#!/usr/bin/env bash
# The whole test suite (unit, integration, task smoke tests) on a fresh machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/lm-eval-lowrank fetch-model >/dev/null  # converts SmolLM2 once (cached)
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
