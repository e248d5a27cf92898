"""Token-level negative log-likelihood shared by the task loss, replay NLL and validation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.collate import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and the number of target tokens.

    Args:
        logits: (B, T, V) next-token logits; half precision is upcast to float32.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken. Position t's logits
            predict labels[t + 1], so labels[:, 0] is never a target.
    """
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return total, (targets != IGNORE_INDEX).sum()


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over target tokens, in nats per token."""
    total, count = token_nll(logits, labels)
    if count == 0:
        raise ValueError("a batch has no target token (every label is IGNORE_INDEX)")
    return total / count
