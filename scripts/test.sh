#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi  # the default run; -m slow or any arguments replace it
.venv/bin/python -m pytest -q "$@"
