"""Context-free sampling: whole sequences drawn from the base model starting from one start token,
as a reproducible stream of batches that any number of processes can share and resume."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..tokens import resolve_start_token
from .config import GenerationError, SamplingConfig
from .prompted import sample_continuations


@torch.no_grad()
def sample_context_free(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SamplingConfig,
    max_sequences: int | None,
    max_tokens: int | None,
    store_topk: int = 0,
    distributed: bool = False,
    written: list[int] | None = None,
) -> Iterator[list[dict]]:
    """Yield batches of sampled records until the budget is met.

    A record holds `input_ids` (start token first) and, with `store_topk=k`, `topk_ids` and
    `topk_logprobs`: for each position t < len(input_ids) - 1, the model's k most likely next
    tokens and their log-probabilities (temperature 1), i.e. its distribution over token t + 1.

    The budget is cut into a global sequence of batches, batch b seeded from (cfg.seed, b), so
    the stream is reproducible (recording the top-k does not change it) and the caller's RNG
    state is left untouched. With `distributed`, every rank of the initialised torch.distributed
    process group calls this: rank r samples batches r, r + W, r + 2W, ... of the same sequence,
    and a token budget is cut after each round of W batches exactly where one process would cut
    it. All ranks together therefore yield the batches a single process would, whatever the world
    size W; on CPU, where batched sampling is deterministic, the very same sequences.

    `written` resumes an interrupted run: the generated-token counts of the records this process
    already holds. Sampling restarts at the batch holding the first missing record (the round
    of W batches, for a token budget) and yields only the records after them.
    """
    if (max_sequences is None) == (max_tokens is None):
        raise GenerationError("give exactly one of max_sequences, max_tokens")
    vocab = model.get_output_embeddings().weight.size(0)
    if not 0 <= store_topk < vocab:
        raise GenerationError(f"store_topk must be in [0, {vocab}) (the vocabulary size), got {store_topk}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    def batch(index: int, n: int) -> list[dict]:
        return _sample_batch(model, tokenizer, cfg, n, index, store_topk)

    if max_sequences is not None:
        yield from _sequence_budget(batch, cfg.batch_size, max_sequences, rank, world, written or [])
    else:
        yield from _token_budget(batch, cfg.batch_size, max_tokens, rank, world, written or [])


Sampler = Callable[[int, int], list[dict]]
"""`batch(index, n)`: batch `index` of the stream, n records."""


def _sequence_budget(batch: Sampler, bs: int, max_sequences: int, rank: int, world: int,
                     written: list[int]) -> Iterator[list[dict]]:
    """Batches r, r + W, ... of a sequence budget, whose every batch size is known in advance;
    `batch(index, n)` samples one."""
    n_batches = -(-max_sequences // bs)
    first, skip = divmod(len(written), bs)  # this rank's batches done, records of the next
    for b in range(rank + first * world, n_batches, world):
        records = batch(b, min(bs, max_sequences - b * bs))[skip:]
        skip = 0
        if records:
            yield records


def _token_budget(batch: Sampler, bs: int, max_tokens: int, rank: int, world: int,
                  written: list[int]) -> Iterator[list[dict]]:
    """Rounds of `world` batches of a token budget, the last cut where one process would cut it."""
    # Restart at the first round some rank has not finished, knowing the tokens of the rounds
    # before it from the records on disk.
    rounds = min(_all_gather_ints(len(written), world)) // bs
    done_tokens = sum(_all_gather_ints(sum(written[: rounds * bs]), world))
    first, skip = rounds * world, len(written) - rounds * bs
    while done_tokens < max_tokens:  # rounds of `world` batches, first..first + world - 1
        records = batch(first + rank, bs)
        counts = _all_gather_ints(sum(len(r["input_ids"]) - 1 for r in records), world)
        before = done_tokens + sum(counts[:rank])  # tokens of the round's earlier batches
        records = fit_token_budget(records, max_tokens - before)
        records, skip = records[skip:], max(0, skip - len(records))
        if records:
            yield records
        done_tokens += sum(counts)
        first += world


def _sample_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SamplingConfig,
                  n: int, batch_index: int, store_topk: int) -> list[dict]:
    """Batch `batch_index` of the context-free stream: n records seeded by (cfg.seed, batch_index)."""
    start_id = resolve_start_token(tokenizer, cfg.start_token)
    records = sample_continuations(model, tokenizer, cfg, [[start_id]] * n, batch_index, store_topk)
    for rec in records:
        del rec["n_prompt"]
    return records


def _all_gather_ints(value: int, world: int) -> list[int]:
    if world == 1:
        return [value]
    gathered: list[int | None] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def fit_token_budget(records: list[dict], remaining: int) -> list[dict]:
    """Keep whole records while they fit; cut the first one that does not so that their generated
    tokens (all but the start token) total `remaining` exactly."""
    kept: list[dict] = []
    for rec in records:
        if remaining <= 0:
            break
        generated = len(rec["input_ids"]) - 1
        if generated > remaining:
            rec = {k: v[: remaining + 1] if k == "input_ids" else v[:remaining] for k, v in rec.items()}
        kept.append(rec)
        remaining -= min(generated, remaining)
    return kept
