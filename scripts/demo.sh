#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the toy-world demo end to end (a two-method `cfs study`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/cfs study --config configs/toy/demo.yaml "$@"
