"""Forward KL to the base model from top-k log-probabilities cached in the replay shards."""

from __future__ import annotations

import torch

from ...streams import CACHED_TOPK, REPLAY
from ..losses import chunked_target_mean
from .base import Regularizer


def topk_forward_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """KL(p_ref || p_theta) coarsened to the reference's top-k tokens plus one bucket for the rest.

    With S the k cached tokens, p_ref(S^c) = 1 - sum_S p_ref and p_theta(S^c) = 1 - sum_S p_theta:
        KL_k = sum_{v in S} p_ref(v) log(p_ref(v) / p_theta(v)) + p_ref(S^c) log(p_ref(S^c) / p_theta(S^c)).
    Coarsening never increases a KL (data-processing inequality), so 0 <= KL_k <= KL, with equality
    when the reference puts no mass outside S; the gap is how differently the two models spread the
    tail mass p_ref(S^c) over the tokens outside S.

    Args:
        logits: (..., V) trainable-model logits.
        topk_ids: (..., k) the reference's most likely next tokens.
        topk_logprobs: (..., k) their log-probabilities under the reference (at temperature 1).

    Returns:
        (...) coarsened KL per position, in nats.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    lse = logits.logsumexp(-1, keepdim=True)
    logq = logits.gather(-1, topk_ids) - lse  # (..., k)
    # log p_theta(S^c) from the logits outside S: exact even when the tail mass is tiny.
    logq_tail = logits.scatter(-1, topk_ids, float("-inf")).logsumexp(-1) - lse.squeeze(-1)
    logp = topk_logprobs.to(dtype)
    p = logp.exp()
    p_tail = (1 - p.sum(-1)).clamp(min=0)
    head = (p * (logp - logq)).sum(-1)
    # The clamp only bites when S is the whole vocabulary (logq_tail = -inf, p_tail ~ 0 by rounding).
    tail = torch.xlogy(p_tail, p_tail) - p_tail * logq_tail.clamp(min=-1e4)
    return head + tail


class KLFromCachedTopK(Regularizer):
    """Forward KL(p_ref || p_theta) on replay sequences from the reference's cached top-k.

    The replay shards must carry `topk_ids` / `topk_logprobs` (`cfs generate --store_topk K`):
    the base model's K most likely next tokens at every position, recorded while sampling. No
    reference model is held in memory. The term is the coarsened KL of `topk_forward_kl`, a lower
    bound of the exact KL that `KLToReference` computes; it is exact where the base model's top-k
    holds all its mass. `benchmarks/topk_kl_error.py` measures the gap on the toy world.

    Memory: formed `chunk_size` target tokens at a time (`heads.head_sum`: about 2 x chunk x V
    float32 values at the peak).
    """

    streams = (REPLAY,)
    needs_columns = {REPLAY: CACHED_TOPK}  # rows sampled during the fit carry none: refused

    def __init__(self, weight: float = 1.0, k: int | None = None, chunk_size: int | None = None,
                 name: str | None = None) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            k: Use only the first k cached tokens (they are sorted by probability); None: all.
            chunk_size: Target tokens per chunk; None: sized by the vocabulary
                (`heads.LOGITS_PER_CHUNK` logits at once).
            name: Log key suffix; default `kl_from_cached_top_k`.
        """
        super().__init__(weight, name)
        if k is not None and k < 1:
            raise ValueError(f"KLFromCachedTopK.k must be >= 1 or None, got {k}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"KLFromCachedTopK.chunk_size must be >= 1 or None, got {chunk_size}")
        self.k, self.chunk_size = k, chunk_size

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        replay = batch[REPLAY]
        if not set(CACHED_TOPK) <= replay.keys():
            raise KeyError(
                f"{self.name} needs the base model's top-k log-probabilities in the replay shards, "
                "but they hold none: regenerate them with `cfs generate ... --store_topk 20`"
            )
        ids, logprobs = (replay[k] for k in CACHED_TOPK)
        if self.k is not None:
            if self.k > ids.size(-1):
                raise ValueError(f"{self.name}: k={self.k} but the shards cache only {ids.size(-1)} tokens")
            ids, logprobs = ids[..., : self.k], logprobs[..., : self.k]
        return chunked_target_mean(topk_forward_kl, replay["labels"], outputs[REPLAY], ids, logprobs,
                                   chunk_size=self.chunk_size, per=self.normalize)
