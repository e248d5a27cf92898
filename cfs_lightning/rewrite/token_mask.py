"""Selective token masking (STM, arXiv 2501.14315): drop the task's high-perplexity tokens from the loss.

One teacher-forced pass of the base model over the tokenized task data scores every response
token by its perplexity exp(CE) given everything before it (the full prompt and the earlier
response tokens; the first response token is scored like any other). Then, per sequence, with
n the number of response tokens whose perplexity exceeds `tau`:
  - `high` (the method): those n tokens get label -100;
  - `random` (control): n response tokens drawn at random (seeded by (seed, row));
  - `low` (control): the n response tokens of lowest perplexity.
The three modes therefore mask the same count in every sequence. Stop tokens (the EOS that ends
each response, `stop_token_ids`) are never masked nor counted: a model never taught where its
answer ends would not stop. Sequences left without a target but their stop token are dropped
and counted. The result is written once, as task shards with provenance, and
trained on through `data.task.shards`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loading import BaseModelArgs
from ..sampling import GenerationError
from ..shards import ShardOutput, provenance, write_shards
from ..tasks import TaskSource
from ..tokens import IGNORE_INDEX, pad_token_id, stop_token_ids
from .scoring import per_token_nll

Mode = Literal["high", "random", "low"]


def mask_tokens(labels: list[int], perplexity: list[float], tau: float, mode: Mode,
                rng: random.Random, keep: frozenset[int] = frozenset()) -> tuple[list[int], int]:
    """`labels` with the chosen response tokens set to -100, and how many were masked.

    `perplexity[t - 1]` is token t's perplexity; position 0 is never a target. Tokens whose id
    is in `keep` (the stop tokens) are never masked and not counted.
    """
    targets = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX and labels[t] not in keep]
    n = sum(perplexity[t - 1] > tau for t in targets)
    if mode == "high":
        chosen = [t for t in targets if perplexity[t - 1] > tau]
    elif mode == "low":
        chosen = sorted(targets, key=lambda t: perplexity[t - 1])[:n]
    elif mode == "random":
        chosen = rng.sample(targets, n)
    else:
        raise GenerationError(f"mode must be 'high', 'random' or 'low', got {mode!r}")
    out = list(labels)
    for t in chosen:
        out[t] = IGNORE_INDEX
    return out, n


def token_mask(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSource,
    output_dir: str | Path,
    tau: float = 2.5,
    mode: Mode = "high",
    seed: int = 0,
    batch_size: int = 16,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Score the task's training split with `model`, mask per `mode`, write the shards; return the manifest."""
    if not tau > 0:
        raise GenerationError(f"tau must be > 0 (a perplexity threshold), got {tau}")
    if mode not in ("high", "random", "low"):
        raise GenerationError(f"mode must be 'high', 'random' or 'low', got {mode!r}")
    data = task.tokenize(task.load(task.split), tokenizer)
    stops = frozenset(stop_token_ids(tokenizer, model))
    stats = {"sequences": len(data), "response_tokens": 0, "masked_tokens": 0, "dropped": 0}
    manifest = {
        **provenance(tokenizer, model, kind="task"), "source": "token_mask",
        "task": task.describe(),
        "tau": tau, "mode": mode, "seed": seed, "stats": stats,
    }

    def batches():
        for start in range(0, len(data), batch_size):
            rows = data[start: start + batch_size]
            scores = per_token_nll(model, rows["input_ids"], pad_token_id(tokenizer), batch_size)
            kept = []
            for i, (ids, labels, nll) in enumerate(zip(rows["input_ids"], rows["labels"], scores, strict=True)):
                ppl = [math.exp(x) for x in nll]
                masked, n = mask_tokens(labels, ppl, tau, mode, random.Random(seed * 1_000_003 + start + i), stops)
                stats["response_tokens"] += sum(x != IGNORE_INDEX for x in labels[1:])
                stats["masked_tokens"] += n
                if all(x == IGNORE_INDEX or x in stops for x in masked[1:]):  # nothing but the stop
                    stats["dropped"] += 1
                    continue
                kept.append({"input_ids": ids, "labels": masked})
            yield kept
        # Runs before the manifest is written; raising here leaves nothing on disk.
        stats["masked_fraction"] = stats["masked_tokens"] / max(1, stats["response_tokens"])
        if stats["dropped"] == stats["sequences"]:
            raise GenerationError(f"tau={tau} masks every response token of every sequence; raise tau")

    return write_shards(output_dir, batches(), manifest, shard_size, overwrite)


def token_mask_command(
    base: BaseModelArgs,
    task: TaskSource,
    output: ShardOutput,
    tau: float = 2.5,
    mode: Mode = "high",
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """`cfs token-mask`: selective token masking (STM), the base model scores every response token
    of the task; those with perplexity above `tau` leave the loss. Train with `data.task.shards`.

    Args:
        base: The base model that scores.
        task: The task to score (its training split).
        output: The task shard directory to write.
        tau: Perplexity threshold (exp of the token's NLL, given all tokens before it).
        mode: `high` masks the tokens above tau; `random` (control) as many random response
            tokens per sequence; `low` (control) as many lowest-perplexity ones.
        seed: Seed of `random` mode.
        batch_size: Sequences per forward pass.
    """
    lm, tok = base.load()
    manifest = token_mask(lm, tok, task, output.dir, tau, mode, seed, batch_size, output.shard_size,
                          output.overwrite)
    stats = manifest["stats"]
    print(f"{Path(output.dir)}: {manifest['num_sequences']} task sequences: masked "
          f"{stats['masked_tokens']} of {stats['response_tokens']} response tokens "
          f"({100 * stats['masked_fraction']:.1f}%, mode {mode}, tau {tau}); dropped {stats['dropped']}")
    return manifest
