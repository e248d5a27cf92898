"""The forgetting meter: KL(p_base || p_theta) per token on validation batches, while training runs.

On the held-out replay sequences (`val/replay_kl`) it is the divergence that the replay NLL
estimates by Monte Carlo, up to the base model's entropy (arXiv 2505.13811): how far the model has
moved from its old distribution where the base model puts its mass. On the task's validation
responses (`val/task_kl`) it is the forward KL on the new task's distribution that "RL's Razor"
(arXiv 2509.04259) finds to predict forgetting.
"""

from __future__ import annotations

import torch

from ..streams import CACHED_TOPK
from .heads import Logits
from .losses import chunked_target_mean, token_divergence
from .reference import FrozenReference
from .regularizers import topk_forward_kl


def meter_source(reference: FrozenReference | None, batch: dict) -> str | None:
    """What the meter can read on this batch: `reference` (exact, full vocabulary), `topk` (the
    replay shards' cached top-k, coarsened to k tokens plus the tail: a lower bound), or None."""
    if reference is not None:
        return "reference"
    return "topk" if set(CACHED_TOPK) <= batch.keys() else None


@torch.no_grad()
def forgetting_kl(
    logits: Logits | torch.Tensor,
    batch: dict,
    reference: FrozenReference | None,
    chunk_size: int | None = None,
) -> torch.Tensor | None:
    """Mean per-token KL(p_base || p_theta) over the batch's target positions, in nats.

    One reference forward per batch (its hidden states; both heads run `chunk_size` target tokens
    at a time, so neither model's (B, T, V) logits exist). Without a reference, the replay shards'
    cached top-k are used if the batch has them (`cfs generate --store_topk K`); else None.

    Args:
        logits: The `Logits` (or (B, T, V) logits) of the model being evaluated on `batch`.
        batch: A padded batch (`input_ids`, `attention_mask`, `labels`, maybe `topk_*`).
        reference: The frozen base model, or None.
        chunk_size: Target tokens per chunk; None: sized by the vocabulary.
    """
    source = meter_source(reference, batch)
    if source is None:
        return None
    if source == "topk":
        return chunked_target_mean(topk_forward_kl, batch["labels"], logits, *(batch[k] for k in CACHED_TOPK),
                                   chunk_size=chunk_size).clamp_min(0)
    hidden = reference.hidden_states(batch["input_ids"], batch["attention_mask"])

    def per_token(chunk_logits: torch.Tensor, chunk_hidden: torch.Tensor) -> torch.Tensor:
        return token_divergence(chunk_logits, reference.logits(chunk_hidden), "forward")

    # a KL is >= 0 (both paths); an unmoved model's rounds to about -1e-9
    with reference.head_gathered():
        return chunked_target_mean(per_token, batch["labels"], logits, hidden, chunk_size=chunk_size).clamp_min(0)
