#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the toy-world demo end to end (a two-method `cfs study` from
# the shipped toy base, data/toy-base). With --rebuild, the base is first built again from its
# configs into runs/toy/base (replacing an earlier rebuild) and the demo runs from that one,
# into runs/toy/demo-rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
  if [[ "$arg" == --rebuild ]]; then
    rm -rf runs/toy/base runs/toy/init runs/toy/pretrain runs/toy/demo-rebuilt
    args+=(--base=runs/toy/base --output_dir=runs/toy/demo-rebuilt)
  else
    args+=("$arg")
  fi
done
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/cfs study --config configs/toy/demo.yaml "${args[@]}"
