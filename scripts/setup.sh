#!/usr/bin/env bash
# Create .venv (if missing) and install cfs_lightning with pinned dependencies; torch first, so the
# exact CPU wheel is chosen before anything else can ask for a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
