"""Run every method overlay of configs/toy/ through `cfs fit` on the toy world and tabulate
retained / downstream scores (lm-eval bits per byte; lower is better) before and after.

Needs the toy base and its replay (the demo builds both: `bash scripts/demo.sh`, or
`cfs demo --config configs/toy/demo.yaml`); replay without cached top-k is regenerated.
    python benchmarks/toy_methods.py [--methods ft cfs-nll ...] [--max_steps N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cfs_lightning.commands import (contextual, corpus, dialogue, generate, rephrase, self_output,
                                    token_mask_command)
from cfs_lightning.generation import read_manifest
from cfs_lightning.toy.demo import _fit, _run_jsonargparse

METHODS = ["ft", "cfs-nll", "cfs-kl", "cfs-kl-topk", "l2", "ema", "lora", "lora+cfs", "cs", "real-replay",
           "self-dialogue", "online", "self-output", "rephrase", "stm"]
REPLAY, TASK = "--data.init_args.replay.dir", "--data.init_args.task.shards"
OWN_DATA = {  # method -> (folder under --runs, command writing it, its config, where the fit reads it)
    "cs": ("cs_replay", contextual, "configs/toy/generate-contextual.yaml", REPLAY),
    "real-replay": ("real_replay", corpus, "configs/toy/generate-corpus.yaml", REPLAY),
    "self-dialogue": ("dialogue_replay", dialogue, "configs/toy/generate-dialogue.yaml", REPLAY),
    "self-output": ("self_output_task", self_output, "configs/toy/generate-self-output.yaml", TASK),
    "rephrase": ("rephrase_task", rephrase, "configs/toy/generate-rephrase.yaml", TASK),
    "stm": ("stm_task", token_mask_command, "configs/toy/generate-token-mask.yaml", TASK),
}
RETAINED, DOWNSTREAM = "eval/shakespeare_heldout/bits_per_byte", "eval/gsm8k_answers/bits_per_byte"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--runs", default="runs/toy")
    parser.add_argument("--max_steps", type=int, default=-1, help="cap each fit (-1: the config's epoch)")
    args = parser.parse_args()
    runs = Path(args.runs)
    replay = runs / "cfs_replay"
    if not (replay / "manifest.json").is_file() or not read_manifest(replay).get("store_topk"):
        _run_jsonargparse(generate, "configs/toy/generate.yaml",
                          {"model": str(runs / "base"), "output_dir": str(replay), "overwrite": True})
    results = runs / "methods" / "results.json"
    rows = json.loads(results.read_text()) if results.is_file() else {}  # earlier methods are kept
    for method in args.methods:
        start = time.perf_counter()
        out = runs / "methods" / method
        data = [f"{REPLAY}={replay}"]
        if method in OWN_DATA:
            folder, command, config, key = OWN_DATA[method]
            own = runs / folder
            if not (own / "manifest.json").is_file():
                arg = "tokenizer" if command is corpus else "model"
                _run_jsonargparse(command, config, {arg: str(runs / "base"), "output_dir": str(own)})
            data = [f"{key}={own}"] + (data if key == TASK else [])
        evals = _fit(["configs/toy/finetune.yaml", f"configs/toy/{method}.yaml"], [
            f"--model.init_args.pretrained={runs / 'base'}", *data,
            f"--trainer.max_steps={args.max_steps}", f"--trainer.logger.init_args.save_dir={out}",
            f"--export.dirpath={out / 'hf_model'}"])
        rows["base"] = {"retained": evals.history[0][RETAINED], "downstream": evals.history[0][DOWNSTREAM]}
        rows[method] = {"retained": evals.history[-1][RETAINED], "downstream": evals.history[-1][DOWNSTREAM],
                        "minutes": (time.perf_counter() - start) / 60}
        results.write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| method | retained bpb (lower better) | downstream bpb (lower better) | fit minutes |",
             "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['retained']:.4f} | {r['downstream']:.4f} | {r.get('minutes', 0):.1f} |")
    table = "\n".join(lines) + "\n"
    (runs / "methods" / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
