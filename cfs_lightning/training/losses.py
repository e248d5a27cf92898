"""Token-level losses: the NLL shared by the task loss, replay NLL and validation, the DFT task
loss, and a chunked per-position mean for full-vocabulary divergences.

Every training term is a sum over a batch's target positions divided by a normalizer
(`NORMALIZATIONS`, the module's `normalize`): `token` divides by the number of target tokens, a
mean in nats per token (the default); `sequence` divides by the number of sequences that have a
target, a mean over sequences of each sequence's summed loss, in nats per sequence: the
expectation over sequences that the CFS objective E_F[-log p(y|x)] + lambda E_x[-log p(x)]
writes (arXiv 2505.13811). Under `token`, each term is a per-token mean of its own stream, so
a replay weight lambda_token equals the paper's lambda_sequence x (mean replay length / mean
response length) in tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

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


Normalization = Literal["token", "sequence"]
NORMALIZATIONS = ("token", "sequence")


def normalizer(mask: torch.Tensor, per: Normalization = "token") -> torch.Tensor:
    """What a sum over the (B, T) target positions `mask` is divided by: their number (`token`)
    or the number of rows with at least one (`sequence`); refuses a batch with none."""
    if per not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {per!r}")
    count = mask.sum() if per == "token" else mask.any(-1).sum()
    if count == 0:
        raise ValueError("a batch has no target token (every label is IGNORE_INDEX)")
    return count


def masked_mean(values: torch.Tensor, mask: torch.Tensor, per: Normalization = "token") -> torch.Tensor:
    """Sum of (B, T) `values` over the target positions `mask`, per target token or per sequence
    (`normalizer`)."""
    return (values * mask).sum() / normalizer(mask, per)


def mean_token_nll(logits: torch.Tensor, labels: torch.Tensor, per: Normalization = "token") -> torch.Tensor:
    """Next-token NLL summed over target tokens, in nats per token (or per sequence: `per`)."""
    return masked_mean(*per_token_nll(logits, labels), per)


def dft_weighted(nll: torch.Tensor, mask: torch.Tensor, per: Normalization = "token") -> torch.Tensor:
    """Dynamic Fine-Tuning's loss (arXiv 2508.05629): mean over targets of sg(p) * NLL.

    Each target token's NLL is scaled by the model's own probability of that token,
    p = exp(-NLL), detached, so the gradient is p * grad(NLL): confident tokens keep their
    full step, improbable ones are damped. The mean is over target tokens, as TRL's
    `loss_type="dft"` and LLaMA-Factory's `use_dft_loss` take it.

    Args:
        nll: (B, T) per-position NLL from `per_token_nll`.
        mask: (B, T) target positions.
        per: `token` (TRL's mean) or `sequence` (`normalizer`).
    """
    return masked_mean(nll * torch.exp(-nll.detach()), mask, per)


def chunked_target_mean(
    per_token: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    *inputs: torch.Tensor,
    chunk_size: int | None = None,
    per: Normalization = "token",
) -> torch.Tensor:
    """Mean of `per_token(*chunk_of_inputs)` over target positions, a chunk of positions at a time
    (the sum over target positions, per target token or per sequence: `normalizer`).

    Position t counts when labels[:, t + 1] is a target. Each input is (B, T, ...) and is sliced
    along T; every chunk runs under activation checkpointing, so its (B, chunk, V)-sized
    intermediates are freed after the forward and recomputed in the backward instead of being
    kept for the whole sequence.

    Args:
        per_token: Maps input chunks to a (B, chunk) tensor of per-position values.
        labels: (B, T) targets, IGNORE_INDEX where no loss is taken.
        chunk_size: Positions per chunk; None: the whole sequence at once.
        per: `token` or `sequence` (`normalizer`).
    """
    valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts target t+1
    count = normalizer(valid, per)
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
