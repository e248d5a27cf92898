"""The GPU check's steps, one per subcommand, each printing one `RESULT {json}` line.

`benchmarks/gpu_check.sh` runs them in order on one GPU; on CPU, `--size tiny` runs the same
steps on a small model in seconds (FSDP1 needs a GPU and is skipped there).

    build   the compatibility matrix's Llama row (the real Llama-3.1 tokenizer, its generation
            config's stops 128001, 128008, 128009) at the Llama-3.2-1B shape (random weights,
            saved in bf16), or at the matrix's own tiny shape
    sample  context-free replay from it: tokens/s, first token, every sequence ends at a stop
    fit     `cfs fit` (bf16-mixed) with NLLReplay + KLToReference and RetainedEval under the
            shipped FSDP1 or FSDP2 strategy config; the export reloads and lm-eval scores it as
            RetainedEval scored the model at the end of training
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import SIZES  # noqa: E402
from tests.families import BY_NAME, build as build_family, stop_ids  # noqa: E402

HELDOUT = REPO / "configs" / "tasks" / "shakespeare_heldout.yaml"
GSM8K = REPO / "data" / "gsm8k"
LLAMA = BY_NAME["llama"]

def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(args) -> None:
    start = time.perf_counter()
    family = dataclasses.replace(LLAMA, config=SIZES["1b"]) if args.size == "1b" else LLAMA
    out = build_family(family, Path(args.out), dtype=torch.bfloat16, device=device())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    result(step="build", parameters=sum(p.numel() for p in model.parameters()),
           vocab=len(AutoTokenizer.from_pretrained(out)), seconds=round(time.perf_counter() - start, 1))


def sample(args) -> None:
    from cfs_lightning.sampling import Budget, SamplingConfig
    from cfs_lightning.replay.context_free import generate_replay
    from cfs_lightning.shards import load_shards, read_manifest

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device()).eval()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, batch_size=args.batch, seed=0)
    if device() == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate_replay(model, tok, Path(args.out), cfg, Budget(sequences=args.sequences))
    if device() == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows = [r["input_ids"].tolist() for r in load_shards(Path(args.out))]
    manifest = read_manifest(Path(args.out))
    stops = set(manifest["stop_token_ids"])
    generated = sum(len(r) - 1 for r in rows)
    ok = (len(rows) == args.sequences and stops == {*stop_ids(LLAMA, tok)} and
          all(r[0] == tok.bos_token_id for r in rows) and
          all(not stops & set(r[1:-1]) and (r[-1] in stops or len(r) == args.new_tokens + 1) for r in rows))
    result(step="sample", ok=ok, sequences=len(rows), generated_tokens=generated, seconds=round(seconds, 2),
           tokens_per_s=round(generated / seconds), stop_token_ids=sorted(stops),
           ended_at_stop=sum(r[-1] in stops for r in rows))


def fit_config(args) -> dict:
    strategy = yaml.safe_load((REPO / "configs" / "strategies" / f"{args.strategy}.yaml").read_text())
    out = Path(args.out)
    trainer = {"accelerator": "gpu" if device() == "cuda" else "cpu", "devices": 1, "max_steps": args.steps,
               "precision": "bf16-mixed", "logger": False, "enable_checkpointing": False,
               "num_sanity_val_steps": 0, "limit_val_batches": 2, "default_root_dir": str(out),
               "callbacks": [{"class_path": "cfs_lightning.callbacks.RetainedEval",
                              "init_args": {"tasks": [str(HELDOUT)], "limit": args.eval_limit, "batch_size": 8}}]}
    trainer.update({k: v for k, v in strategy["trainer"].items() if k not in ("accelerator", "devices")})
    return {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "cfs_lightning.training.CausalLMFineTuner", "init_args": {
            "pretrained": args.model, "reference": "copy",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-5}},
            "regularizers": [{"class_path": "cfs_lightning.training.regularizers.NLLReplay"},
                             {"class_path": "cfs_lightning.training.regularizers.KLToReference"}]}},
        "data": {"class_path": "cfs_lightning.data.ReplayDataModule", "init_args": {
            "task": {"path": "json", "data_files": {"train": str(GSM8K / "train.jsonl"),
                                                     "test": str(GSM8K / "test.jsonl")},
                     "split": f"train[:{args.steps * args.batch}]", "val_split": "test[:16]",
                     "max_length": args.max_length, "prompt": "Question: {question}\nAnswer:",
                     "response": " {answer}"},
            "batch_size": args.batch, "replay_ratio": 0.5, "replay": {"dir": args.replay, "val_size": 8}}},
        "export": {"dirpath": str(out / "hf")},
    }


def fit(args) -> None:
    from cfs_lightning.experiments.runner import run_cli
    from cfs_lightning.evaluation import evaluate_lm, load_task_yaml

    if args.strategy == "fsdp" and device() != "cuda":
        result(step=f"fit-{args.strategy}", ok=None, skipped="FSDP1 needs a GPU")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.yaml").write_text(yaml.safe_dump(fit_config(args)))
    if device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli = run_cli(["fit", "--config", str(out / "fit.yaml")])
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    retained = next(cb for cb in trainer.callbacks if type(cb).__name__ == "RetainedEval")
    key = "eval/shakespeare_heldout/bits_per_byte"
    history = [h[key] for h in retained.history]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device() == "cuda" else None
    del cli, trainer
    exported = AutoModelForCausalLM.from_pretrained(out / "hf").to(device())
    tok = AutoTokenizer.from_pretrained(out / "hf")
    scores, _, _ = evaluate_lm(exported, tok, [load_task_yaml(str(HELDOUT))], batch_size=8, limit=args.eval_limit)
    reloaded = scores["shakespeare_heldout/bits_per_byte"]
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device())
    moved = max((a - b).abs().max().item() for a, b in zip(exported.parameters(), base.parameters()))
    finite = all(v == v and abs(v) != float("inf") for v in metrics.values())
    ok = (finite and {"train/reg/nll_replay", "train/reg/kl_to_reference"} <= metrics.keys()
          and len(history) >= 2 and abs(reloaded - history[-1]) <= 1e-2 * abs(history[-1]) and moved > 0)
    result(step=f"fit-{args.strategy}", ok=ok, seconds=round(seconds, 1), peak_gib=peak and round(peak, 1),
           retained_bpb=history, reloaded_export_bpb=reloaded, max_weight_change=moved,
           **{k: round(v, 4) for k, v in sorted(metrics.items())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("build")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=["1b", "tiny"], default="1b")
    p = sub.add_parser("sample")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sequences", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=128)
    p = sub.add_parser("fit")
    p.add_argument("--model", required=True)
    p.add_argument("--replay", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", choices=["fsdp", "fsdp2"], required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=32)
    args = parser.parse_args()
    {"build": build, "sample": sample, "fit": fit}[args.step](args)


if __name__ == "__main__":
    main()
