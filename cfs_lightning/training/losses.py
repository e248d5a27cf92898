"""Token-level losses, formed a chunk of target tokens at a time from the model's final hidden
states, so that a step never holds the (B, T, V) logits.

Every loss is a sum over a batch's target positions of a per-token function of the logits
(`heads.head_sum`, which runs the output head on a chunk of target tokens at a time): the NLL
(`nll`), and the divergence between two next-token distributions (`token_divergence`) that the
KL terms, SDFT and the forgetting meter take.

Every training term is that sum divided by a normalizer (`NORMALIZATIONS`, the module's
`normalize`): `token` divides by the number of target tokens, a mean in nats per token (the
default); `sequence` divides by the number of sequences that have a target, a mean over
sequences of each sequence's summed loss, in nats per sequence: the expectation over sequences
that the CFS objective E_F[-log p(y|x)] + lambda E_x[-log p(x)] writes (arXiv 2505.13811). Under
`token`, each term is a per-token mean of its own stream, so a replay weight lambda_token equals
the paper's lambda_sequence x (mean replay length / mean response length) in tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from ..tokens import IGNORE_INDEX
from .heads import Logits, head_sum

Normalization = Literal["token", "sequence"]
NORMALIZATIONS = ("token", "sequence")


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose next token is a target: position t predicts
    labels[:, t + 1], so the last position predicts nothing."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def next_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) the token each position predicts, labels[:, t + 1] (IGNORE_INDEX at the last)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def normalizer(mask: torch.Tensor, per: Normalization = "token") -> torch.Tensor:
    """What a sum over the (B, T) target positions `mask` is divided by: their number (`token`)
    or the number of rows with at least one (`sequence`); refuses a batch with none."""
    if per not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {per!r}")
    count = mask.sum() if per == "token" else mask.any(-1).sum()
    if count == 0:
        raise ValueError("a batch has no target token (every label is IGNORE_INDEX)")
    return count


def chunked_target_mean(
    per_token: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    logits: Logits | torch.Tensor,
    *inputs: torch.Tensor,
    chunk_size: int | None = None,
    per: Normalization = "token",
) -> torch.Tensor:
    """Mean of `per_token(logits, *inputs)` over target positions (`head_sum` over
    `target_positions`, divided by `normalizer`).

    Args:
        per_token: Maps (N, V) logits and (N, ...) input rows to (N,) values.
        labels: (B, T) targets, IGNORE_INDEX where no loss is taken; position t counts when
            labels[:, t + 1] is a target.
        logits: The stream's `Logits` (or (B, T, V) logits).
        inputs: (B, T, ...) tensors read at the same positions.
        chunk_size: Target tokens per chunk; None: sized by the vocabulary (`heads.chunk_tokens`).
        per: `token` or `sequence` (`normalizer`).
    """
    valid = target_positions(labels)
    count = normalizer(valid, per)
    return head_sum(per_token, logits, valid, *inputs, chunk_size=chunk_size) / count


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) next-token NLL in nats of (N, V) logits (upcast to at least float32) and (N,) targets."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def mean_token_loss(
    logits: Logits | torch.Tensor,
    labels: torch.Tensor,
    per: Normalization = "token",
    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nll,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """A next-token loss (`nll` by default; a task loss's `per_token`) summed over target tokens, in
    nats per token (or per sequence: `per`)."""
    return chunked_target_mean(per_token, labels, logits, next_targets(labels), chunk_size=chunk_size, per=per)


def token_nll(logits: Logits | torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and the number of target tokens."""
    valid = target_positions(labels)
    return head_sum(nll, logits, valid, next_targets(labels)), valid.sum()


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from (finite) log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


class _ForwardKL(torch.autograd.Function):
    """KL(softmax(ref_logits) || softmax(logits)) per position, with a hand-written backward.

    Autograd through `_kl` holds five (..., V) tensors at once (both log-softmaxes, p, the
    difference and the product) and replays each op backwards. Here the forward holds two (log p,
    reused in place, and p) and keeps p and the log-normaliser of `logits`; the backward is
    d KL / d logits = softmax(logits) - p, formed in one buffer. No gradient reaches ref_logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
        lse = logits.logsumexp(-1, keepdim=True)
        logp = ref_logits.log_softmax(-1)
        p = logp.exp()
        ctx.save_for_backward(logits, lse, p)
        return logp.sub_(logits).add_(lse).mul_(p).sum(-1)  # sum p (log p - log q)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, p = ctx.saved_tensors
        return (logits - lse).exp_().sub_(p).mul_(grad.unsqueeze(-1)), None


def token_divergence(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    direction: Literal["forward", "reverse"] = "forward",
    beta: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence between the next-token distributions at every position, in nats.

    With p_ref = softmax(ref_logits / temperature) and p_theta = softmax(logits / temperature)
    (computed in at least float32):
      - `beta=None, direction="forward"`: KL(p_ref || p_theta), mode-covering; the quantity whose
        Monte Carlo estimate on base-model samples is the replay NLL;
      - `beta=None, direction="reverse"`: KL(p_theta || p_ref), mode-seeking;
      - `beta` in [0, 1]: the generalised Jensen-Shannon divergence in TRL's GKD convention,
        with the reference as the teacher: M = beta * p_ref + (1 - beta) * p_theta and
        JSD_beta = beta * KL(p_ref || M) + (1 - beta) * KL(p_theta || M). As in TRL the endpoints
        are defined as the KLs themselves: beta=0 is forward KL(p_ref || p_theta), beta=1 is
        reverse KL(p_theta || p_ref); beta=0.5 is the symmetric Jensen-Shannon divergence.
        The divergence is therefore discontinuous at both ends: for beta in (0, 1) it is at most
        the binary entropy -beta log(beta) - (1 - beta) log(1 - beta) nats, which tends to 0 as
        beta approaches 0 or 1, while at 0 and 1 it jumps to a KL, which can be many nats.

    Args:
        logits: (..., V) trainable-model logits.
        ref_logits: (..., V) reference logits.

    Returns:
        (...) divergence per position.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, ref_logits = logits.to(dtype), ref_logits.to(dtype)
    if temperature != 1.0:
        logits, ref_logits = logits / temperature, ref_logits / temperature
    if (beta == 0 or (beta is None and direction == "forward")) and not ref_logits.requires_grad:
        return _ForwardKL.apply(logits, ref_logits)
    logq = logits.log_softmax(-1)  # trainable
    logp = ref_logits.log_softmax(-1)  # reference
    if beta is None:
        return _kl(logp, logq) if direction == "forward" else _kl(logq, logp)
    if beta == 0:
        return _kl(logp, logq)
    if beta == 1:
        return _kl(logq, logp)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
