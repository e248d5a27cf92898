"""Contextual synthetic (CS) replay: the base model's own continuations of the task prompts.

The weaker baseline of the context-free paper (arXiv 2505.13811): instead of starting from the
start token alone, the frozen base model continues each task prompt (templated as for training),
and prompt + continuation is replayed with an all-token loss. Prompts are drawn in an order
shuffled by the sampling seed, cycling when the budget asks for more sequences than there are
prompts; batch b is seeded by (seed, b), so the set is reproducible.

Prompts longer than `max_length - 1` tokens and continuations that end at once (an immediate
stop token) are skipped and counted in the manifest; if every prompt is skipped it is an error.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loading import BaseModelArgs
from ..sampling import Budget, GenerationError, SamplingConfig, sample_continuations
from ..shards import ShardOutput, provenance, write_shards
from ..tasks import TaskSource
from ..tokens import eval_mode, stop_token_ids


def contextual_replay(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSource,
    output_dir: str | Path,
    sampling: SamplingConfig,
    budget: Budget,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Sample continuations of the task's training prompts into `output_dir`; return the manifest.

    Sequences are cut at `task.max_length` tokens (prompt included). `budget.fraction` counts the
    task's training examples; `budget.tokens` counts continuation tokens only (the manifest's
    `contextual_stats.continuation_tokens`; `num_generated_tokens` counts every replayed token
    after the first, prompts included).
    """
    records = task.load(task.split)
    prompts = [task.prompt_ids(r, tokenizer) for r in records]
    stats = {"prompts": len(prompts), "prompts_too_long": 0, "empty_continuations": 0,
             "continuation_tokens": 0}
    usable = [p for p in prompts if len(p) < task.max_length]
    stats["prompts_too_long"] = len(prompts) - len(usable)
    if not usable:
        raise GenerationError(
            f"every task prompt is at least task.max_length={task.max_length} tokens long, leaving "
            "no room for a continuation; raise task.max_length"
        )
    max_sequences, max_tokens = budget.resolve(len(records))
    manifest = {
        **provenance(tokenizer, model),
        "source": "contextual",
        "task": task.describe(),
        "sampling": sampling.to_dict(),
        "budget": {"requested": vars(budget), "task_size": len(records),
                   "max_sequences": max_sequences, "max_tokens": max_tokens},
        "contextual_stats": stats,
    }
    with eval_mode(model):
        stream = _sample(model, tokenizer, sampling, usable, task.max_length, max_sequences, max_tokens, stats)
        return write_shards(output_dir, stream, manifest, shard_size, overwrite)


def _sample(model, tokenizer, cfg: SamplingConfig, prompts: list[list[int]], max_length: int,
            max_sequences: int | None, max_tokens: int | None, stats: dict) -> Iterator[list[dict]]:
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    stops = stop_token_ids(tokenizer, model)
    done_seqs = done_tokens = batch = drawn = 0
    while (max_sequences is None or done_seqs < max_sequences) and (max_tokens is None or done_tokens < max_tokens):
        want = cfg.batch_size if max_sequences is None else min(cfg.batch_size, max_sequences - done_seqs)
        chosen = [prompts[order[(drawn + i) % len(order)]] for i in range(want)]
        drawn += want
        kept = []
        for rec in sample_continuations(model, tokenizer, cfg, chosen, batch):
            n_prompt = rec.pop("n_prompt")
            rec["input_ids"] = rec["input_ids"][:max_length]
            n_new = len(rec["input_ids"]) - n_prompt
            if n_new == 0 or (n_new == 1 and rec["input_ids"][-1] in stops):
                stats["empty_continuations"] += 1
                continue
            if max_tokens is not None:
                n_new = min(n_new, max_tokens - done_tokens)
                rec["input_ids"] = rec["input_ids"][: n_prompt + n_new]
            kept.append(rec)
            done_seqs, done_tokens = done_seqs + 1, done_tokens + n_new
            stats["continuation_tokens"] = done_tokens
            if done_tokens == max_tokens:
                break
        batch += 1
        if batch > 10 and done_seqs == 0:
            raise GenerationError(
                f"the first {drawn} continuations were all empty (the model ends every prompt at "
                "once); check the prompt template and the stop tokens (the manifest's stop_tokens)"
            )
        yield kept


def contextual(
    base: BaseModelArgs,
    task: TaskSource,
    output: ShardOutput,
    budget: Budget,
    sampling: SamplingConfig = SamplingConfig(),
) -> dict:
    """`cfs contextual`: contextual synthetic replay, the base model's continuations of the task
    prompts.

    Args:
        base: The base model that continues the prompts.
        task: The task whose training prompts are continued (templated as for training).
        output: The replay directory to write.
        budget: How much: `sequences`, generated `tokens`, or `fraction` of the task's size.
        sampling: Sampling settings (temperature 1, no truncation by default).
    """
    lm, tok = base.load()
    manifest = contextual_replay(lm, tok, task, output.dir, sampling, budget, output.shard_size, output.overwrite)
    print(f"{Path(output.dir)}: {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} "
          f"tokens; skipped: {manifest['contextual_stats']}")
    return manifest
