"""Context-free sampling: whole sequences drawn from the base model starting from one start token.

Sampling from the start token alone, at temperature 1 with no top-k/top-p truncation, draws
sequences from the base model's own distribution p_base. The all-token NLL of the trainable model
on such sequences is then a Monte Carlo estimate of KL(p_base || p_theta) up to a constant (the
base model's entropy), which is what makes context-free replay an anchor to the old distribution
(arXiv 2505.13811). Any truncation or temperature != 1 biases that estimate; the knobs exist for
experiments, not for the default recipe.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .tasks import TaskSource
from .tokens import pad_token_id, resolve_start_token, stop_token_ids


class GenerationError(ValueError):
    """A sampling setting or budget cannot be honoured; the message names the setting to change."""


@dataclass
class SamplingConfig:
    """How replay sequences are drawn from the base model."""

    temperature: float = 1.0
    """Softmax temperature. 1.0 samples p_base itself, which the unbiased KL estimate needs."""
    top_p: float | None = None
    """Nucleus truncation; None disables it (the default: truncation biases the KL estimate)."""
    top_k: int | None = None
    """Top-k truncation; None disables it (the default: truncation biases the KL estimate)."""
    max_new_tokens: int = 256
    """Tokens generated after the start token, at most."""
    stop_at_eos: bool = True
    """Stop a sequence at its first stop token, kept as its last token: the tokenizer's EOS or any
    `eos_token_id` of the model's generation config (`cfs_lightning.tokens.stop_token_ids`).
    False: always max_new_tokens."""
    batch_size: int = 64
    """Sequences sampled in parallel per `generate` call (KV-cached). Larger batches sample more
    tokens per second (on 2 CPU cores, 0.37x a teacher-forced pass at 64, 0.73x at 256;
    benchmarks/RESULTS.md) at the cost of a larger KV cache."""
    seed: int = 0
    """Seed of the sampling stream. The same seed and settings give the same sequences."""
    start_token: str | None = None
    """Token every sequence starts from. None uses the tokenizer's BOS token; tokenizers without
    one (Qwen, OLMo) need it set, to their document separator (`<|endoftext|>`), not to a chat
    end-of-turn token such as Qwen's EOS `<|im_end|>`."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 or None, got {self.top_k}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise GenerationError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    """How much replay to generate: exactly one of the three fields."""

    sequences: int | None = None
    """A number of sequences."""
    tokens: int | None = None
    """A number of generated tokens (the start token not counted); the last sequence is cut so the
    total is exact."""
    fraction: float | None = None
    """A fraction of the task dataset's size, in sequences: 0.1 = one replay sequence for every
    ten task examples."""

    def __post_init__(self) -> None:
        given = [k for k in ("sequences", "tokens", "fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise GenerationError(
                f"budget needs exactly one of sequences, tokens, fraction; got {given or 'none'}"
            )
        value = getattr(self, given[0])
        if value <= 0:
            raise GenerationError(f"budget.{given[0]} must be > 0, got {value}")

    def task_size(self, task: TaskSource | None) -> int | None:
        """What `resolve` needs to know of the task: its training examples when the budget is a
        fraction of them (counted only then), else None."""
        return len(task.load(task.split)) if self.fraction is not None and task is not None else None

    def resolve(self, task_size: int | None = None) -> tuple[int | None, int | None]:
        """Return (max_sequences, max_tokens); exactly one is not None."""
        if self.fraction is None:
            return self.sequences, self.tokens
        if task_size is None:
            raise GenerationError(
                "budget.fraction needs the task dataset's size: give a `task` source next to the "
                "budget, or use budget.sequences / budget.tokens"
            )
        return max(1, math.floor(self.fraction * task_size + 0.5)), None


def _generation_config(cfg: SamplingConfig, stops: list[int], pad_id: int) -> GenerationConfig:
    # Decoding is greedy over the scores `_processors` returns, whose last step draws the sample
    # itself; `_without_checkpoint_settings` keeps the checkpoint's generation_config.json out.
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stops if cfg.stop_at_eos else [],
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        use_cache=True,
    )


def _processors(cfg: SamplingConfig, recorder: TopKRecorder | None = None,
                n_tokens: int | None = None) -> LogitsProcessorList:
    """The model's logits -> (recorded) -> ids past the tokenizer's `n_tokens` removed ->
    temperature -> top-k -> top-p -> one sampled token."""
    steps: list[LogitsProcessor] = [recorder] if recorder is not None else []
    if n_tokens is not None:
        steps.append(TokenizerVocabulary(n_tokens))
    if cfg.temperature != 1.0:
        steps.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k is not None:
        steps.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        steps.append(TopPLogitsWarper(cfg.top_p))
    return LogitsProcessorList([*steps, InverseCDFSampler()])


@contextlib.contextmanager
def _without_checkpoint_settings(model: torch.nn.Module) -> Iterator[None]:
    """`generate` with none of the checkpoint's own generation settings.

    transformers fills every field our `GenerationConfig` leaves unset from the model's
    `generation_config` (the checkpoint's generation_config.json), and hub checkpoints set fields
    that change the sampled distribution: `no_repeat_ngram_size`, `suppress_tokens`,
    `begin_suppress_tokens`, `bad_words_ids`, `min_new_tokens`, `sequence_bias`,
    `forced_eos_token_id`, `repetition_penalty`, ... For the block, the model (the transformers
    model inside a LoRA wrapper) holds a blank `GenerationConfig`, so that the samples and the
    recorded top-k are the model's raw softmax under `SamplingConfig` alone. Its stop tokens are
    read before (`stop_token_ids`).
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def _trim(row: list[int], stops: list[int], stop_at_eos: bool) -> list[int]:
    """Cut a generated row after its first stop token (position 0 is the start token)."""
    if stop_at_eos:
        for t, token in enumerate(row[1:], 1):
            if token in stops:
                return row[: t + 1]
    return row


class TokenizerVocabulary(LogitsProcessor):
    """Never samples an id the tokenizer does not have.

    Checkpoints often pad the embedding matrix past the tokenizer (Qwen3: 151,936 rows for
    151,669 tokens; Gemma 3: 262,208 for 262,145). A trained model gives those rows almost no
    mass, a random or damaged one does not; a sampled padding id could not be decoded and its
    shard would be refused. The recorded top-k (before this step) stays the model's own.
    """

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.index_fill(-1, torch.arange(self.n_tokens, scores.size(-1), device=scores.device),
                                 float("-inf"))


class InverseCDFSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores) and returns scores whose argmax is it.

    Inverse-CDF sampling: one uniform number per row, located in the cumulative distribution.
    On CPU, multinomial (or a Gumbel-max draw) spends one random number per vocabulary entry
    and was ~20x slower for a (64, 2048) batch, a sixth of the whole sampling time of a small
    model (benchmarks/RESULTS.md). Tokens of probability 0 (truncated by top-k/top-p) are never
    drawn: the search returns the first entry whose cumulative mass exceeds the draw.

    The sums and the uniform draw are float64 (`inverse_cdf`). A float32 cumulative sum (and a
    float32 softmax's normalizer) moves in steps of ~6e-8 near 1, so each interval is rounded to
    a multiple of that: on a 151,936-token vocabulary with normal(0, 3) logits that drew from a
    distribution 9e-4 away in total variation, with 3e-4 of the mass on tokens that could never
    be drawn; in float64 the distance is 2e-8 (float32's own rounding of each probability), and
    every token of positive float32 weight can be drawn. It costs a (B, V) float64 cumulative
    sum: on 2 CPU cores at batch 64 a draw took 1.35x / 1.49x / 1.43x a float32 one, +0.9 / +14 /
    +22 ms per step for 49k / 152k / 262k tokens (`benchmarks/run.py`, its sampler rows).
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.rand(scores.size(0), 1, device=scores.device, dtype=torch.float64)
        token = inverse_cdf(scores, uniform)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token, 0.0)


def inverse_cdf(scores: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(B, 1) ids: where each row's `uniform` draw in [0, 1) falls in the cumulative distribution
    of softmax(scores) (B, V).

    Each probability is exp(score - max) in float32 (exact to float32's relative precision) and
    is summed unnormalized in float64: normalizing would be a float32 sum of its own.
    """
    scores = scores.float()
    cdf = (scores - scores.amax(-1, keepdim=True)).exp_().double().cumsum_(-1)  # (B, V), unnormalized
    token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    return token.clamp_(max=cdf.size(-1) - 1)


class TopKRecorder(LogitsProcessor):
    """Records the model's top-k next-token log-probabilities at every step; changes nothing.

    First in `_processors`, and transformers adds none of its own (`_generation_config`, and no
    checkpoint settings: `_without_checkpoint_settings`): the record is p_base at temperature 1
    whatever temperature or truncation the sampling uses.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.ids: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        top = scores.float().log_softmax(-1).topk(self.k, dim=-1)  # sorted, most likely first
        self.ids.append(top.indices.to(torch.int32))
        self.logprobs.append(top.values)
        return scores

    def per_row(self) -> tuple[list, list]:
        """(B, steps, k) ids and log-probabilities as nested lists."""
        return (torch.stack(self.ids, 1).tolist(), torch.stack(self.logprobs, 1).tolist())


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
    process group calls this: rank r samples
    batches r, r + W, r + 2W, ... of the same sequence, and a token budget is cut after each round
    of W batches exactly where one process would cut it. All ranks together therefore yield the
    batches a single process would, whatever the world size W; on CPU, where batched sampling is
    deterministic, the very same sequences.

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
    written, bs = written or [], cfg.batch_size
    if max_sequences is not None:  # every batch size is known in advance
        n_batches = -(-max_sequences // bs)
        first, skip = divmod(len(written), bs)  # this rank's batches done, records of the next
        for b in range(rank + first * world, n_batches, world):
            n = min(bs, max_sequences - b * bs)
            records = _sample_batch(model, tokenizer, cfg, n, b, store_topk)[skip:]
            skip = 0
            if records:
                yield records
        return
    # A token budget is cut by rounds of `world` batches: restart at the first round some rank
    # has not finished, knowing the tokens of the rounds before it from the records on disk.
    rounds = min(_all_gather_ints(len(written), world)) // bs
    done_tokens = sum(_all_gather_ints(sum(written[: rounds * bs]), world))
    first, skip = rounds * world, len(written) - rounds * bs
    while done_tokens < max_tokens:  # rounds of `world` batches, first..first + world - 1
        records = _sample_batch(model, tokenizer, cfg, bs, first + rank, store_topk)
        counts = _all_gather_ints(sum(len(r["input_ids"]) - 1 for r in records), world)
        before = done_tokens + sum(counts[:rank])  # tokens of the round's earlier batches
        records = _fit_token_budget(records, max_tokens - before)
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


@torch.no_grad()
def sample_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SamplingConfig,
                         prompts: list[list[int]], batch_index: int, store_topk: int = 0) -> list[dict]:
    """One batched `generate` over `prompts` (left-padded), seeded by (cfg.seed, batch_index).

    Each record's `input_ids` is its prompt followed by the continuation, cut after its first stop
    token (`stop_token_ids`, with `cfg.stop_at_eos`); `n_prompt` is the prompt's length. The
    caller's RNG is untouched.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad_id = pad_token_id(tokenizer)
    stops = stop_token_ids(tokenizer, model)
    vocab = model.get_output_embeddings().weight.size(0)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    recorder = TopKRecorder(store_topk) if store_topk else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            _without_checkpoint_settings(model):
        torch.manual_seed(cfg.seed * 1_000_003 + batch_index)
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=_generation_config(cfg, stops, pad_id),
            logits_processor=_processors(cfg, recorder, len(tokenizer) if vocab > len(tokenizer) else None),
        )
    records = []
    for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
        cont = _trim([None, *row], stops, cfg.stop_at_eos)[1:]
        records.append({"input_ids": prompt + cont, "n_prompt": len(prompt)})
    if recorder is not None:
        for rec, ids_k, logprobs in zip(records, *recorder.per_row(), strict=True):
            n_gen = len(rec["input_ids"]) - rec["n_prompt"]
            rec["topk_ids"], rec["topk_logprobs"] = ids_k[:n_gen], logprobs[:n_gen]
    return records


def _all_gather_ints(value: int, world: int) -> list[int]:
    if world == 1:
        return [value]
    gathered: list[int | None] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _fit_token_budget(records: list[dict], remaining: int) -> list[dict]:
    """Keep whole records while they fit; cut the first one that does not so the total is exact."""
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
