"""Token-level losses: the NLL shared by the task loss, replay NLL and validation, the DFT task
loss, and a chunked per-position mean for full-vocabulary divergences."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..tokens import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose next token is a target: position t predicts
    labels[:, t + 1], so the last position predicts nothing."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL (nats) at every position, and the mask of positions that have a target.

    Args:
        logits: (B, T, V) next-token logits; half precision is upcast to float32.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken. Position t's logits
            predict labels[t + 1], so labels[:, 0] is never a target.

    Returns:
        (B, T) NLL, 0 where there is no target, and the (B, T) boolean target mask.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # Shift the labels, not the logits: logits[:, :-1] is not contiguous, and flattening it
    # would copy the whole (B, T, V) tensor. The last position gets no target instead.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    )
    return nll.view(targets.shape), target_positions(labels)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and the number of target tokens (see `per_token_nll`)."""
    nll, mask = per_token_nll(logits, labels)
    return nll.sum(), mask.sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T) `values` over the target positions `mask`; refuses a batch with none."""
    count = mask.sum()
    if count == 0:
        raise ValueError("a batch has no target token (every label is IGNORE_INDEX)")
    return (values * mask).sum() / count


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over target tokens, in nats per token."""
    return masked_mean(*per_token_nll(logits, labels))


def dft_weighted(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning's loss (arXiv 2508.05629): mean over targets of sg(p) * NLL.

    Each target token's NLL is scaled by the model's own probability of that token,
    p = exp(-NLL), detached, so the gradient is p * grad(NLL): confident tokens keep their
    full step, improbable ones are damped. The mean is over target tokens, as TRL's
    `loss_type="dft"` and LLaMA-Factory's `use_dft_loss` take it.

    Args:
        nll: (B, T) per-position NLL from `per_token_nll`.
        mask: (B, T) target positions.
    """
    return masked_mean(nll * torch.exp(-nll.detach()), mask)


def chunked_target_mean(
    per_token: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    *inputs: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean of `per_token(*chunk_of_inputs)` over target positions, a chunk of positions at a time.

    Position t counts when labels[:, t + 1] is a target. Each input is (B, T, ...) and is sliced
    along T; every chunk runs under activation checkpointing, so its (B, chunk, V)-sized
    intermediates are freed after the forward and recomputed in the backward instead of being
    kept for the whole sequence.

    Args:
        per_token: Maps input chunks to a (B, chunk) tensor of per-position values.
        labels: (B, T) targets, IGNORE_INDEX where no loss is taken.
        chunk_size: Positions per chunk; None: the whole sequence at once.
    """
    valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts target t+1
    count = valid.sum()
    if count == 0:
        raise ValueError("a batch has no target token (every label is IGNORE_INDEX)")
    width = valid.size(1)
    step = chunk_size or width

    def chunk_sum(mask: torch.Tensor, *chunk: torch.Tensor) -> torch.Tensor:
        return (per_token(*chunk) * mask).sum()

    total = 0.0
    for start in range(0, width, step):
        sl = slice(start, min(start + step, width))
        total = total + checkpoint(chunk_sum, valid[:, sl], *(x[:, sl] for x in inputs),
                                   use_reentrant=False)
    return total / count
