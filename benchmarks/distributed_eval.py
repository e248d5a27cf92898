"""Retained-task evaluation on 1 process vs 2 (torch.distributed, gloo): time and agreement.

The toy base model is scored on the toy tasks (held-out Shakespeare, GSM8K answers) by
`evaluate_lm`, as `RetainedEval` does in training, by one process and by two processes that split
the documents between them. Adding a rank adds a device: each process gets the same share of the
cores (`--cores / 2` threads), so "1 process" vs "2 processes" is the scaling a second GPU would
give; one process with all the cores is shown too (the same hardware split differently). Prints a
table of wall times, their ratios, and the largest metric difference.
    python benchmarks/distributed_eval.py [--model runs/toy/base] [--limit 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["configs/tasks/shakespeare_heldout.yaml", "configs/tasks/gsm8k_answers.yaml"]


def worker(args: argparse.Namespace) -> None:
    """Score the model once (as one rank of a torchrun group when WORLD_SIZE > 1); rank 0 writes."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfs_lightning.evaluation import evaluate_lm, task_manager_for, task_specs

    torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    specs = task_specs(TASKS)
    manager = task_manager_for(specs)
    evaluate_lm(model, tok, specs, batch_size=args.batch_size, limit=4, task_manager=manager)  # warm-up
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    scores = evaluate_lm(model, tok, specs, batch_size=args.batch_size, limit=args.limit, task_manager=manager)
    seconds = time.perf_counter() - start
    if scores is not None:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "metrics": scores[0]}))
    if distributed:
        dist.destroy_process_group()


def run(processes: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    script = [__file__, "--worker", f"--threads={threads}", f"--out={out}", f"--model={args.model}",
              f"--limit={args.limit}", f"--batch_size={args.batch_size}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(launcher + script, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/toy/base")
    parser.add_argument("--limit", type=int, default=400, help="documents per task")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    share = max(1, args.cores // 2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(1, share, run(1, share, args, Path(tmp) / "a.json")),
                (2, share, run(2, share, args, Path(tmp) / "b.json")),
                (1, args.cores, run(1, args.cores, args, Path(tmp) / "c.json"))]
    base = rows[0][2]
    print(f"retained-task evaluation, {args.limit} documents per task, {args.cores} cores\n")
    print("| processes | threads each | seconds | time vs 1 process of the same share |")
    print("|---|---|---|---|")
    for processes, threads, result in rows:
        print(f"| {processes} | {threads} | {result['seconds']:.2f} | {result['seconds'] / base['seconds']:.2f} |")
    diff = max(abs(base["metrics"][k] - rows[1][2]["metrics"][k]) for k in base["metrics"])
    print(f"\nlargest metric difference, 2 vs 1 process: {diff:.2e}")
    for key in sorted(base["metrics"]):
        print(f"  {key}: {base['metrics'][key]:.6f} vs {rows[1][2]['metrics'][key]:.6f}")


if __name__ == "__main__":
    main()
