"""Generation-side figures: context-free sampling against a teacher-forced forward pass over the
same sequences (its bound) and against sampling one sequence at a time; and what the exact
(float64) inverse-CDF draw costs against a float32 one at real vocabulary sizes."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from harness import Setting, figure, interleaved, ratios
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.sampling import InverseCDFSampler, SamplingConfig, sample_context_free
from cfs_lightning.tokens import pad_token_id, resolve_start_token

SINGLE = 2
"""Sequences the one-at-a-time loop samples per repetition (it is the slow arm)."""


def sampled(model, tokenizer, cfg: SamplingConfig, n: int) -> list[list[int]]:
    return [rec["input_ids"] for batch in sample_context_free(model, tokenizer, cfg, n, None) for rec in batch]


def generation_figures(setting: Setting, model_dir: Path, batch_size: int, new_tokens: int,
                       large_batch: int | None = None, start_token: str | None = None,
                       against_transformers: bool = False) -> tuple[list[dict], dict]:
    """Figures and raw rates (generated or forwarded tokens per second). `batch_size` is the
    sampling batch the targets apply to; `large_batch` adds an untargeted row showing how the
    first ratio grows with the batch; `against_transformers` adds transformers' own
    `generate(do_sample=True)` from the same start token at the same batch."""
    dtype = torch.bfloat16 if setting.precision.startswith("bf16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(setting.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # stop_at_eos=False: every row has exactly new_tokens tokens, so all arms count the same work.
    cfg = dict(max_new_tokens=new_tokens, stop_at_eos=False, start_token=start_token)
    latest: dict[int, torch.Tensor] = {}  # batch size -> the rows it sampled last

    def batched(rep: int, batch_size: int = batch_size) -> float:
        setting.sync()
        start = time.perf_counter()
        ids = sampled(model, tokenizer, SamplingConfig(batch_size=batch_size, seed=rep, **cfg), batch_size)
        setting.sync()
        latest[batch_size] = torch.tensor(ids)
        return batch_size * new_tokens / (time.perf_counter() - start)

    def forward(rep: int, batch_size: int = batch_size) -> float:
        ids = latest[batch_size].to(setting.device)  # start token included
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

    def transformers_sampling(rep: int) -> float:
        start_id = resolve_start_token(tokenizer, start_token)
        ids = torch.full((batch_size, 1), start_id, device=setting.device)
        torch.manual_seed(rep)
        with torch.no_grad():
            setting.sync()
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                           top_p=1.0, temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=pad_token_id(tokenizer))
            setting.sync()
        return batch_size * new_tokens / (time.perf_counter() - start)

    arms = {"batched": batched, "forward": forward, "single": single}
    if against_transformers:
        arms["transformers"] = transformers_sampling
    for size in filter(None, (batch_size, large_batch)):
        batched(-1, size)  # warm-up (the first generate call builds caches), and rows to forward
    if large_batch:
        arms["large batch"] = lambda rep: batched(rep, large_batch)
        arms["large forward"] = lambda rep: forward(rep, large_batch)
    rates = interleaved(arms, setting.repeats)
    figures = [
        figure(f"generation tok/s (batch {batch_size}) / teacher-forced forward tok/s",
                  ratios(rates, "batched", "forward"), 0.5, ">="),
        figure("generation tok/s / one-sequence-at-a-time generate", ratios(rates, "batched", "single"),
                  10, ">="),
    ]
    if against_transformers:
        figures.append(figure(f"generation tok/s / transformers generate(do_sample=True) tok/s (batch {batch_size})",
                              ratios(rates, "batched", "transformers"), 1.5, ">="))
    if large_batch:
        figures.append(figure(f"generation tok/s (batch {large_batch}) / teacher-forced forward tok/s",
                              ratios(rates, "large batch", "large forward"), None, ">="))
    return figures, rates


VOCABULARIES = {"SmolLM2": 49_152, "Qwen3": 151_936, "Gemma 3": 262_144}
"""Output-head widths the sampler draws over."""


def float32_draw(scores: torch.Tensor) -> torch.Tensor:
    """The reference arm: the same inverse-CDF draw with a float32 softmax and cumulative sum,
    whose intervals are rounded to ~6e-8 (`InverseCDFSampler` explains why it is not used)."""
    cdf = scores.float().softmax(-1).cumsum_(-1)
    draw = torch.rand(cdf.size(0), 1, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.size(-1) - 1)
    return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)  # as the sampler returns it


def sampler_figures(setting: Setting, batch_size: int) -> tuple[list[dict], dict]:
    """Seconds per draw of a (batch_size, V) batch of scores: the exact sampler / float32, per V."""
    figures, times = [], {}
    for name, vocab in VOCABULARIES.items():
        scores = torch.randn(batch_size, vocab, device=setting.device) * 3

        def timed(draw):
            def arm(rep: int) -> float:
                setting.sync()
                start = time.perf_counter()
                for _ in range(5):
                    draw(scores)
                setting.sync()
                return (time.perf_counter() - start) / 5
            return arm

        timed(float32_draw)(-1)  # warm-up
        rates = interleaved({"exact": timed(lambda s: InverseCDFSampler()(None, s)),
                             "float32": timed(float32_draw)}, setting.repeats)
        times[name] = rates
        figures.append(figure(f"sampler draw, float64 sums / float32 ({name}, {vocab:,} tokens, batch {batch_size})",
                              ratios(rates, "exact", "float32"), None, "<="))
    return figures, times
