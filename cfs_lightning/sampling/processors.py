"""The chain each sampled token goes through: the model's logits -> (recorded) -> ids past the
tokenizer removed -> temperature -> top-k -> top-p -> one token drawn by inverse CDF."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .config import SamplingConfig


def logits_processors(cfg: SamplingConfig, recorder: TopKRecorder | None = None,
                      n_tokens: int | None = None) -> LogitsProcessorList:
    """The model's logits -> (recorded) -> ids past the tokenizer's `n_tokens` removed ->
    temperature -> top-k -> top-p -> one sampled token.

    `generate` decodes greedily over what the chain returns (`generation_config`): its last step
    draws the sample itself.
    """
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

    First in `logits_processors`, and transformers adds none of its own (`generation_config`, and
    no checkpoint settings: `without_checkpoint_settings`): the record is p_base at temperature 1
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
