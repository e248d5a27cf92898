"""Generation-side figures: context-free sampling against a teacher-forced forward pass over the
same sequences (its bound) and against sampling one sequence at a time."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from harness import Setting, figure, interleaved, median_ratio
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.generation.sampler import SamplingConfig, sample_context_free

SINGLE = 2
"""Sequences the one-at-a-time loop samples per repetition (it is the slow arm)."""


def sampled(model, tokenizer, cfg: SamplingConfig, n: int) -> list[list[int]]:
    return [rec["input_ids"] for batch in sample_context_free(model, tokenizer, cfg, n, None) for rec in batch]


def generation_figures(setting: Setting, model_dir: Path, batch_size: int, new_tokens: int) -> tuple[list[dict], dict, torch.Tensor]:
    """Figures, raw rates (generated or forwarded tokens per second), and the sampled rows."""
    dtype = torch.bfloat16 if setting.precision.startswith("bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(setting.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # stop_at_eos=False: every row has exactly new_tokens tokens, so all arms count the same work.
    cfg = dict(max_new_tokens=new_tokens, stop_at_eos=False)
    latest: list[torch.Tensor] = []

    def batched(rep: int) -> float:
        setting.sync()
        start = time.perf_counter()
        ids = sampled(model, tokenizer, SamplingConfig(batch_size=batch_size, seed=rep, **cfg), batch_size)
        setting.sync()
        latest[:] = [torch.tensor(ids)]
        return batch_size * new_tokens / (time.perf_counter() - start)

    def forward(rep: int) -> float:
        ids = latest[0].to(setting.device)  # the rows sampled last, start token included
        with torch.no_grad():
            setting.sync()
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            setting.sync()
        return ids.numel() / (time.perf_counter() - start)

    def single(rep: int) -> float:
        setting.sync()
        start = time.perf_counter()
        sampled(model, tokenizer, SamplingConfig(batch_size=1, seed=rep, **cfg), SINGLE)
        setting.sync()
        return SINGLE * new_tokens / (time.perf_counter() - start)

    batched(-1)  # warm-up: the first generate call builds caches and picks kernels
    rates = interleaved({"batched": batched, "forward": forward, "single": single}, setting.repeats)
    figures = [
        figure(f"generation tok/s (batch {batch_size}) / teacher-forced forward tok/s",
                  median_ratio(rates, "batched", "forward"), 0.5, ">="),
        figure("generation tok/s / one-sequence-at-a-time generate", median_ratio(rates, "batched", "single"),
                  10, ">="),
    ]
    return figures, rates, latest[0]
