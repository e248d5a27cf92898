#!/usr/bin/env bash
# Download, into .whl/, the wheels benchmarks/gpu_check.sh installs on a GPU machine that cannot
# download: the packages cfs_lightning needs that such a machine lacks (datasets, lm-eval,
# jsonargparse and their own dependencies), for CPython 3.12 on x86-64 Linux. Torch, transformers,
# lightning, peft, numpy, pandas, pyarrow and the rest are the machine's own. Versions are those
# this project pins (pyproject.toml) and those the pins resolve to. Packages published only as
# source are built here into pure-Python wheels.
#   bash scripts/fetch_gpu_wheels.sh    # ~15 MB in .whl/ (ignored by git, carried to the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
WHEELS=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  lm-eval==0.4.13 evaluate==0.4.6 more-itertools==11.2.1 pytablewriter==1.2.1 dataproperty==1.1.1
  mbstrdecoder==1.1.5 chardet==6.0.0.post1 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7
  typepy==1.3.5 pytz==2026.6 nltk==3.10.4
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
)
SOURCE_ONLY=(rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl "${SOURCE_ONLY[@]}"
ls .whl
du -sh .whl
