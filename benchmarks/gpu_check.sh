#!/usr/bin/env bash
# The GPU check: one run of at most 10 minutes (the step limits sum to 585 s) on one H100/H200 that exercises every GPU path.
#   1. build   a Llama-3.2-1B-shaped model (random weights, the real Llama-3.1 tokenizer and stops)
#   2. sample  context-free replay from it in bf16: tokens/s; every sequence starts at BOS and ends
#              at the first of the generation config's stops
#   3. fit     bf16-mixed `cfs fit` with NLLReplay + KLToReference and RetainedEval (lm-eval), under
#              configs/strategies/fsdp.yaml (FSDP1, one device), then export -> reload -> the same
#              lm-eval score
#   4. fit     the same under configs/strategies/fsdp2.yaml (FSDP2)
#   5. bench   benchmarks/run.py --device cuda (step-time ratios, MFU, generation, memory), shortened
#   6. shapes  benchmarks/run.py --device cuda --model smollm2|gemma3 --random_weights: every method's
#              step time and peak memory at the real checkpoints' shapes (Gemma 3's 262k-token head)
# Each step has its own time limit and a failing step does not stop the others; the last lines are
# one RESULT per step. Logs and results go to $OUT (default runs/gpu_check).
#
# The GPU machine lacks datasets, lm-eval and jsonargparse and cannot download: first, here,
#   bash scripts/fetch_gpu_wheels.sh
# then, with the device tool: command `bash benchmarks/gpu_check.sh`, carry [".whl"], timeout 600.
# On a CPU machine with the project's venv, `GPU_CHECK_SIZE=tiny bash benchmarks/gpu_check.sh`
# runs steps 1-4 on a tiny model (FSDP1 reported as skipped) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cfs-gpu-check.XXXXXX")
SIZE=${GPU_CHECK_SIZE:-1b}
mkdir -p "$OUT"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "$PY" = python3 ] && compgen -G ".whl/*.whl" > /dev/null; then  # no venv here: the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$WORK/hf_home"
began=$SECONDS

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import sys, torch, transformers, lightning, peft, datasets, lm_eval, jsonargparse
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| lightning', lightning.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__,
      '| lm_eval', lm_eval.__version__, '| jsonargparse', jsonargparse.__version__)"
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, keep its RESULT
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s, $((SECONDS - began)) s into the check)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  grep '^RESULT ' "$OUT/$name.log" >> "$OUT/results.jsonl" \
    || echo "RESULT {\"step\": \"$name\", \"ok\": $([ $rc = 0 ] && echo true || echo false), \"rc\": $rc}" >> "$OUT/results.jsonl"
  [ $rc = 0 ] || tail -25 "$OUT/$name.log"
  echo "    rc $rc, $((SECONDS - start)) s"
}

rm -f "$OUT/results.jsonl"
CHECK=benchmarks/gpu_check.py
step build 60 "$PY" "$CHECK" build --out "$WORK/base" --size "$SIZE"
if [ "$SIZE" = tiny ]; then SMALL=(--steps 4 --batch 4 --max_length 128 --eval_limit 4); SAMPLE=(--sequences 16 --batch 16 --new_tokens 32)
else SMALL=(); SAMPLE=(); fi
step sample 60 "$PY" "$CHECK" sample --model "$WORK/base" --out "$WORK/replay" "${SAMPLE[@]}"
step fit-fsdp 105 "$PY" "$CHECK" fit --model "$WORK/base" --replay "$WORK/replay" --out "$WORK/fsdp" \
  --strategy fsdp "${SMALL[@]}"
step fit-fsdp2 105 "$PY" "$CHECK" fit --model "$WORK/base" --replay "$WORK/replay" --out "$WORK/fsdp2" \
  --strategy fsdp2 "${SMALL[@]}"
if [ "$SIZE" = 1b ]; then
  step bench 140 "$PY" benchmarks/run.py --device cuda --repeats 2 --steps 5 --warmup 2 --no_trl \
    --out "$OUT/results-cuda.json"
  tail -22 "$OUT/bench.log"
  for shape in smollm2 gemma3; do  # the real checkpoints' shapes, random weights: 262k-token head included
    step "shape-$shape" 75 "$PY" benchmarks/run.py --device cuda --model "$shape" --random_weights --repeats 1 \
      --steps 3 --warmup 1 --gen_tokens 32 --no_trl --out "$OUT/results-cuda-$shape.json"
    tail -24 "$OUT/shape-$shape.log"
  done
fi
echo "=== results ($((SECONDS - began)) s)"
cat "$OUT/results.jsonl"
rm -rf "$WORK"
