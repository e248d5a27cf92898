"""What replay costs: every speed and memory figure of cfs_lightning against its bound, in one run.

One process measures every figure side by side: the arms of each ratio run interleaved, their
order rotated per repetition, and each ratio is the median over repetitions of the ratio within a
repetition, so a slow phase of a noisy machine hits numerator and denominator alike. Prints one
markdown table and writes it, with the raw timings, as JSON.

The model is a Llama shape with random weights built from config (`--size small`: ~4M parameters,
for CPUs; `--size 1b`: the Llama-3.2-1B body, for a GPU) and a BPE tokenizer trained on the
shipped tinyshakespeare text; nothing is downloaded. Training figures use fixed random batches
(the data pipeline is timed on its own, on the toy GSM8K task and generated replay).
`--model smollm2|gemma3` measures a real pretrained checkpoint instead (fetched by `cfs fetch`
when missing): every method's step time and peak memory against plain fine-tuning, the chunked
losses against whole (B, T, V) logits, bf16 against float32, MFU, TRL's SFTTrainer and sampling.
    python benchmarks/run.py                                  # CPU, ~7 minutes on 2 cores
    python benchmarks/run.py --device cuda                    # GPU: 1B shape, bf16-mixed
    python benchmarks/run.py --model smollm2                  # SmolLM2-135M-Instruct, bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import generation_figures, sampler_figures  # noqa: E402
from harness import Setting, build_model_dir, figure, ratios, task_batch  # noqa: E402
from training import (REAL_ARMS, loader_figure, memory_figures, mfu_figure, real_memory_figures, scratch,  # noqa: E402
                      step_figures, step_times, topk_replay)

from cfs_lightning.checkpoints import fetch
from cfs_lightning.sampling import Budget, SamplingConfig
from cfs_lightning.replay.context_free import generate_replay

DEFAULTS = {  # per device: size, batch, sequence length, generation batch, repeats, steps, warm-up, precision
    "cpu": dict(size="small", batch_size=8, seq_len=128, gen_batch=64, repeats=7, steps=6, warmup=2,
                precision="32-true"),
    "cuda": dict(size="1b", batch_size=8, seq_len=1024, gen_batch=64, repeats=5, steps=10, warmup=3,
                 precision="bf16-mixed"),
    "real": dict(batch_size=8, seq_len=256, gen_batch=64, repeats=3, steps=2, warmup=1, precision="bf16-mixed"),
}
MODELS = {  # --model: the checkpoint (`cfs fetch --name`) and the token its documents start with
    "smollm2": ("smollm2-135m-instruct", "<|endoftext|>"),
    "gemma3": ("gemma-3-270m", None),
}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=["small", "1b"], help="model shape (default: small on CPU, 1b on CUDA)")
    parser.add_argument("--model", choices=sorted(MODELS), help="a real pretrained checkpoint instead of --size")
    parser.add_argument("--random_weights", action="store_true",
                        help="with --model: the checkpoint's shape with random weights, nothing fetched (the GPU check)")
    parser.add_argument("--batch_size", type=int, help="task sequences per step")
    parser.add_argument("--replay_ratio", type=float, default=0.5, help="replay sequences per task sequence")
    parser.add_argument("--seq_len", type=int, help="tokens per training sequence")
    parser.add_argument("--gen_batch", type=int, help="sequences sampled per generate call")
    parser.add_argument("--gen_batch_large", type=int, default=256,
                        help="a larger sampling batch, reported without a target (0: skip)")
    parser.add_argument("--gen_tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions of every arm")
    parser.add_argument("--steps", type=int, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, help="training steps run before timing")
    parser.add_argument("--precision", help="Lightning precision (default: 32-true on CPU, bf16-mixed on CUDA)")
    parser.add_argument("--no_trl", action="store_true", help="skip the TRL SFTTrainer comparison")
    parser.add_argument("--out", help="JSON file to write (default: benchmarks/results-<device>.json)")
    args = parser.parse_args()
    if args.model and args.size:
        parser.error("give --model or --size, not both")
    for key, value in DEFAULTS["real" if args.model else args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def main() -> None:
    args = parse()
    if args.model:
        return main_real(args)
    setting = Setting(device=args.device, size=args.size, batch_size=args.batch_size, replay_ratio=args.replay_ratio,
                      seq_len=args.seq_len, repeats=args.repeats, steps=args.steps, warmup=args.warmup,
                      precision=args.precision)
    began = time.perf_counter()
    work = scratch()
    model_dir = build_model_dir(work / "model", setting.size)
    figures, raw = [], {}

    gen, rates = generation_figures(setting, model_dir, args.gen_batch, args.gen_tokens, args.gen_batch_large)
    figures += gen
    raw["generation_tokens_per_s"] = rates
    draws, raw["sampler_seconds"] = sampler_figures(setting, args.gen_batch)
    figures += draws

    base, both = fixed_batches(setting, model_dir)
    task = both["task"]

    extra = {}
    if not args.no_trl:
        from trl_baseline import trl_step_time
        extra["TRL SFTTrainer"] = lambda rep: trl_step_time(setting, model_dir, task, work / "trl")
    times = step_times(setting, model_dir, both, extra)
    raw["step_seconds"] = times
    figures += step_figures(setting, times)
    if not args.no_trl:
        figures.append(figure("step time: plain FT / TRL SFTTrainer (its default gradient checkpointing)",
                              ratios(times, "plain FT", "TRL SFTTrainer"), 1.0, "<="))
    mfu, raw["mfu"] = mfu_figure(setting, model_dir, times)
    figures.append(mfu)

    generate_replay(base, AutoTokenizer.from_pretrained(model_dir), work / "replay",
                    SamplingConfig(max_new_tokens=setting.seq_len - 1, batch_size=args.gen_batch),
                    Budget(sequences=2 * args.gen_batch))
    loader, raw["loader"] = loader_figure(setting, model_dir, work / "replay", times)
    figures.append(loader)

    mem, raw["memory"] = memory_figures(setting, model_dir, both)
    figures += mem

    report(args, figures, raw, began, f"results-{args.device}.json")


def fixed_batches(setting: Setting, model_dir: Path) -> tuple[torch.nn.Module, dict[str, dict]]:
    """The base model (float32, eval) and the fixed training batches every arm trains on: random
    task rows, and replay rows carrying the base's cached top-k."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    gen_ids = torch.Generator().manual_seed(1)
    task = task_batch(setting.batch_size, setting.seq_len, vocab, gen_ids)
    replay_ids = torch.randint(3, vocab, (setting.replay_batch_size, setting.seq_len), generator=gen_ids)
    base = AutoModelForCausalLM.from_pretrained(model_dir).to(setting.device).eval()
    return base, {"task": task, "replay": topk_replay(base, replay_ids)}


def main_real(args: argparse.Namespace) -> None:
    """The figures on a real checkpoint: no data-loader or LoRA rows (the small shape has them)."""
    name, start_token = MODELS[args.model]
    work = scratch()
    if args.random_weights:
        model_dir, start_token = build_model_dir(work / "model", args.model), None
    else:
        model_dir = fetch(name)[name]
    setting = Setting(device=args.device, size=name, batch_size=args.batch_size, replay_ratio=args.replay_ratio,
                      seq_len=args.seq_len, repeats=args.repeats, steps=args.steps, warmup=args.warmup,
                      precision=args.precision, memory_every=0.005)
    began = time.perf_counter()
    figures, raw = [], {}
    gen, raw["generation_tokens_per_s"] = generation_figures(setting, model_dir, args.gen_batch, args.gen_tokens,
                                                             start_token=start_token, against_transformers=True)
    figures += gen

    base, both = fixed_batches(setting, model_dir)
    task = both["task"]
    copy_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    del base

    peaks = {}
    extra = {}
    if not args.no_trl:
        from trl_baseline import trl_step_time
        extra["TRL SFTTrainer"] = lambda rep: trl_step_time(setting, model_dir, task, work / "trl",
                                                            peaks.setdefault("TRL SFTTrainer", []))
    times = step_times(setting, model_dir, both, extra, REAL_ARMS, peaks)
    raw["step_seconds"], raw["peak_bytes"] = times, peaks
    figures += step_figures(setting, times)
    if not args.no_trl:  # SFTTrainer checkpoints activations by default: compared with the arm that does too
        figures.append(figure("step time: plain FT with activation checkpointing / TRL SFTTrainer (its default "
                              "gradient checkpointing)", ratios(times, "plain FT, activation checkpointing",
                                                                "TRL SFTTrainer"), 1.0, "<="))
    mfu, raw["mfu"] = mfu_figure(setting, model_dir, times)
    fp32 = Setting(**{**vars(setting), "precision": "32-true"})
    mfu32, raw["mfu_32"] = mfu_figure(fp32, model_dir, {"plain FT": times["plain FT, 32-true"]})
    figures += [mfu, mfu32]
    figures += real_memory_figures(peaks, copy_bytes)

    report(args, figures, raw, began, f"results-{args.model}.json")


def report(args: argparse.Namespace, figures: list[dict], raw: dict, began: float, default: str) -> None:
    """Print the table and write it with the raw timings as JSON (`--out`, or `default` here)."""
    result = {"setting": vars(args), "machine": _machine(), "figures": figures, "raw": raw,
              "wall_seconds": time.perf_counter() - began}
    out = Path(args.out or Path(__file__).parent / default)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nwritten to {out} ({result['wall_seconds']:.0f} s)")


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": _cpu_model()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo) and the bf16 matrix units it reports."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    units = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(units) or 'no bf16 units'})"


def table(report: dict) -> str:
    s = report["setting"]
    name = f"{s['model']}{' shape (random weights)' if s.get('random_weights') else ''}" if s.get("model") else s["size"]
    lines = [f"{name} model on {s['device']} ({s['precision']}), batch {s['batch_size']} task + "
             f"replay ratio {s['replay_ratio']}, {s['seq_len']} tokens per sequence, medians of "
             f"{s['repeats']} interleaved repetitions\n",
             "| figure | median | range over repetitions | bound | met |", "|---|---|---|---|---|"]
    for f in report["figures"]:
        bound = "-" if f["bound"] is None else f"{f['sense']} {f['bound']:.3g}"
        met = {True: "yes", False: "**no**", None: "-"}[f["ok"]]
        spread = f"{f['low']:.3f} - {f['high']:.3f}" if f["high"] > f["low"] else "-"
        lines.append(f"| {f['figure']} | {f['value']:.3f} | {spread} | {bound} | {met} |")
    mfu = report["raw"]["mfu"]
    lines.append(f"\nmeasured peak matmul rate ({mfu['matmul_dtype']}): {mfu['peak_matmul_flops'] / 1e12:.2f} TFLOP/s; "
                 f"plain FT achieved {mfu['achieved_flops'] / 1e12:.3f} TFLOP/s")
    if "mfu_32" in report["raw"]:
        mfu = report["raw"]["mfu_32"]
        lines.append(f"measured peak matmul rate ({mfu['matmul_dtype']}): {mfu['peak_matmul_flops'] / 1e12:.2f} TFLOP/s; "
                     f"plain FT achieved {mfu['achieved_flops'] / 1e12:.3f} TFLOP/s")
    if "peak_bytes" in report["raw"]:
        lines.append("peak memory GiB (largest over repetitions, model construction included): " + ", ".join(
            f"{k} {max(v) / 2**30:.2f}" for k, v in report["raw"]["peak_bytes"].items()))
    steps = report["raw"]["step_seconds"]
    lines.append("median step seconds: " + ", ".join(f"{k} {statistics.median(v):.4f}" for k, v in steps.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
