"""Peak memory of LoRA training with and without a KL reference, per way of holding it.

Each configuration trains `--steps` steps of the toy fine-tuning setup (task + replay batches)
in a fresh process; the table gives the peak memory increase over the process's memory before
the model was built, and its ratio to LoRA alone. CUDA: peak allocated bytes. CPU: bytes in use
by the C heap (glibc `mallinfo2`, which serves torch's CPU tensors), read after every aten
operation; the resident set size would also count freed-but-cached pages and is too noisy.
The target: LoRA + KLToReference with `reference: adapters_disabled` within 5% of LoRA alone.
    python benchmarks/lora_reference_memory.py [--model runs/toy/base] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import json
import subprocess
import sys

from torch.utils._python_dispatch import TorchDispatchMode

from cfs_lightning.regularizers import KLToReference

KL_CHUNK = inspect.signature(KLToReference).parameters["chunk_size"].default
CONFIGS = {
    "LoRA alone (NLL replay)": {"lora": True, "kl": None},
    "LoRA + KL, adapters_disabled": {"lora": True, "kl": "adapters_disabled"},
    "LoRA + KL, frozen copy": {"lora": True, "kl": "copy"},
}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes allocated by malloc and not freed: small blocks plus mmapped large ones."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class HeapPeak(TorchDispatchMode):
    """Tracks the peak of `heap_in_use()` sampled after every aten operation."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


def run_one(model: str, replay: str, steps: int, chunk_size: int, lora: bool, kl: str | None) -> dict:
    import lightning as L
    import torch

    from cfs_lightning.data import ReplayConfig, ReplayDataModule, TaskSource
    from cfs_lightning.lora import LoRA
    from cfs_lightning.module import CausalLMFineTuner
    from cfs_lightning.regularizers import NLLReplay

    cuda = torch.cuda.is_available()
    task = TaskSource(path="json", data_files={"train": "data/gsm8k/train.jsonl"}, split="train[:800]",
                      prompt="Question: {question}\nAnswer:", response=" {answer}", max_length=512)
    dm = ReplayDataModule(task, tokenizer=model, batch_size=16, replay_ratio=0.5,
                          replay=ReplayConfig(dir=replay, val_size=0, strict=False))
    dm.setup("fit")
    before = torch.cuda.memory_allocated() if cuda else heap_in_use()
    regs = [NLLReplay()] + ([KLToReference(chunk_size=chunk_size)] if kl else [])
    module = CausalLMFineTuner(model, regularizers=regs, lora=LoRA() if lora else None,
                               reference=kl or "auto")
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with contextlib.nullcontext() if cuda else HeapPeak() as tracker:
        trainer.fit(module, datamodule=dm)
    peak = torch.cuda.max_memory_allocated() if cuda else tracker.peak
    return {"peak_increase": peak - before, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/toy/base")
    parser.add_argument("--replay", default="runs/toy/cfs_replay")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk_size", type=int, default=KL_CHUNK, help="KLToReference.chunk_size")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.model, args.replay, args.steps, args.chunk_size,
                                 **json.loads(args.one))))
        return
    results = {}
    for name, cfg in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--replay", args.replay,
                              "--steps", str(args.steps), "--chunk_size", str(args.chunk_size),
                              "--one", json.dumps(cfg)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["LoRA alone (NLL replay)"]["peak_increase"]
    device = next(iter(results.values()))["device"]
    print(f"model {args.model}, {args.steps} steps, batch 16 task + 8 replay, KL chunk_size "
          f"{args.chunk_size}, on {device}\n")
    print("| configuration | peak increase (MiB) | ratio to LoRA alone |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['peak_increase'] / 2**20:.1f} | {r['peak_increase'] / base:.3f} |")


if __name__ == "__main__":
    main()
