"""Token-level losses, formed a chunk of target tokens at a time from the model's final hidden
states, so that a step never holds the (B, T, V) logits.

A stream's next-token logits are a `Logits`: the final hidden states (B, T, H) and the output
head that maps them to logits (or, where the head cannot be split off, the (B, T, V) logits
themselves). Every loss is a sum over a batch's target positions of a per-token function of the
logits (`head_sum`): the rows of the target positions are gathered, and the head and the function
run on `chunk` of them at a time. With gradients on, each chunk's gradients with respect to its
hidden states and the head's parameters are formed right there (`_ChunkedHead`), so the logits of
a chunk, and everything the function derives from them, are freed before the next chunk: at most
about `LOGITS_PER_CHUNK` logits exist at once, and the head runs once forward and twice backward
per token, as it does in the unchunked step. Only target positions reach the head: prompt and
padding positions cost nothing there.

Every training term is that sum divided by a normalizer (`NORMALIZATIONS`, the module's
`normalize`): `token` divides by the number of target tokens, a mean in nats per token (the
default); `sequence` divides by the number of sequences that have a target, a mean over
sequences of each sequence's summed loss, in nats per sequence: the expectation over sequences
that the CFS objective E_F[-log p(y|x)] + lambda E_x[-log p(x)] writes (arXiv 2505.13811). Under
`token`, each term is a per-token mean of its own stream, so a replay weight lambda_token equals
the paper's lambda_sequence x (mean replay length / mean response length) in tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..tokens import IGNORE_INDEX

LOGITS_PER_CHUNK = 2**26
"""Logits formed at once by default (256 MiB in float32): the chunk holds this many divided by the
vocabulary size tokens, e.g. 1,365 for SmolLM2's 49,152 and 256 for Gemma 3's 262,144."""

Normalization = Literal["token", "sequence"]
NORMALIZATIONS = ("token", "sequence")


@dataclass
class Logits:
    """One stream's next-token logits, held as what they are computed from.

    Attributes:
        hidden: (B, T, H) final hidden states; with `head` None, (B, T, V) logits.
        head: Maps (N, H) hidden states to (N, V) logits (with any post-processing, e.g.
            soft-capping); None when `hidden` already holds the logits.
        params: The head's parameters (those that require grad receive their gradients).
        vocab_size: V, the head's output size.
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    params: Sequence[torch.Tensor] = field(default_factory=tuple)
    vocab_size: int | None = None

    @property
    def vocab(self) -> int:
        """V: the head's output size, or the logits' last dimension."""
        if self.head is None:
            return self.hidden.size(-1)
        if self.vocab_size is None:
            raise ValueError("Logits with a head need its vocab_size")
        return self.vocab_size

    def full(self) -> torch.Tensor:
        """(B, T, V) logits, whole: for small vocabularies and tests only."""
        return self.hidden if self.head is None else self.head(self.hidden)


def as_logits(logits: Logits | torch.Tensor) -> Logits:
    """A `Logits`, from a (B, T, V) tensor if need be."""
    return logits if isinstance(logits, Logits) else Logits(logits)


def chunk_tokens(vocab: int, chunk_size: int | None = None) -> int:
    """Target tokens per chunk: `chunk_size`, or `LOGITS_PER_CHUNK // vocab` when None."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return chunk_size or max(1, LOGITS_PER_CHUNK // vocab)


class _ChunkedHead(torch.autograd.Function):
    """sum_n per_token(head(hidden[n]), *extras[n]) over rows n, a chunk of rows at a time.

    The forward pass also forms, chunk by chunk, the sum's gradients with respect to the hidden
    rows and the head's parameters that need one (by autograd on the chunk alone), and keeps only
    those; the backward pass scales them, in place, by the incoming gradient. No chunk's logits
    outlive it. With no input needing a gradient, the chunks run without autograd. The gradients
    are buffers of this call, not inputs or outputs, so they are kept on `ctx`.
    """

    @staticmethod
    def forward(ctx, per_token, head, size, n_extras, hidden, *tensors):
        extras, params = tensors[:n_extras], tensors[n_extras:]
        wants_hidden = ctx.needs_input_grad[4]
        wants = [i for i, w in enumerate(ctx.needs_input_grad[5 + n_extras:]) if w]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_params: dict[int, torch.Tensor] = {}  # the first chunk's gradient becomes the buffer
        total = torch.zeros((), dtype=acc, device=hidden.device)
        differentiated = wants_hidden or bool(wants)
        for start in range(0, hidden.size(0), size):
            rows = slice(start, start + size)
            h = hidden[rows].detach().requires_grad_(wants_hidden)
            with torch.set_grad_enabled(differentiated):
                logits = head(h) if head is not None else h
                value = per_token(logits, *(x[rows] for x in extras)).sum()
            total += value.detach().to(acc)
            if not differentiated:
                continue
            grads = torch.autograd.grad(value, ([h] if wants_hidden else []) + [params[i] for i in wants],
                                        allow_unused=True)
            if wants_hidden:
                grad_hidden[rows] = grads[0]
            for i, g in zip(wants, grads[1:] if wants_hidden else grads):
                if g is None:  # a parameter this head does not use
                    continue
                if i in grad_params:
                    grad_params[i] += g
                else:
                    grad_params[i] = g.to(torch.promote_types(g.dtype, torch.float32))
        ctx.grads, ctx.n_extras, ctx.dtypes = (grad_hidden, grad_params), n_extras, [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("a chunked loss was differentiated twice; its gradients are used up by the first "
                               "backward pass (retain_graph is not supported)")
        grad_hidden, grad_params = ctx.grads
        ctx.grads = None  # scaled in place below: one backward pass
        if grad_hidden is not None:
            grad_hidden.mul_(grad)
        params = [grad_params[i].mul_(grad).to(dtype) if i in grad_params else None
                  for i, dtype in enumerate(ctx.dtypes)]
        return (None, None, None, None, grad_hidden, *([None] * ctx.n_extras), *params)


def head_sum(
    per_token: Callable[..., torch.Tensor],
    logits: Logits | torch.Tensor,
    positions: torch.Tensor,
    *inputs: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over the True `positions` of `per_token(logits at the position, *inputs at it)`.

    Args:
        per_token: Maps (N, V) logits and (N, ...) rows of each input to (N,) values.
        logits: The stream's `Logits` (or a (B, T, V) tensor).
        positions: (B, T) boolean mask of the positions summed over.
        inputs: (B, T, ...) tensors read at the same positions (targets, reference states, ...).
        chunk_size: Positions per chunk; None: `LOGITS_PER_CHUNK` logits' worth.
    """
    logits = as_logits(logits)
    hidden = logits.hidden[positions]  # (N, H)
    rows = [x[positions] for x in inputs]
    # Under no_grad nothing is differentiated: no input is marked as needing a gradient.
    params = [p for p in logits.params if p.requires_grad] if torch.is_grad_enabled() else []
    hidden = hidden if torch.is_grad_enabled() else hidden.detach()
    return _ChunkedHead.apply(per_token, logits.head, chunk_tokens(logits.vocab, chunk_size), len(rows),
                              hidden, *rows, *params)


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
        chunk_size: Target tokens per chunk; None: sized by the vocabulary (`chunk_tokens`).
        per: `token` or `sequence` (`normalizer`).
    """
    valid = target_positions(labels)
    count = normalizer(valid, per)
    return head_sum(per_token, logits, valid, *inputs, chunk_size=chunk_size) / count


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) next-token NLL in nats of (N, V) logits (upcast to at least float32) and (N,) targets."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def dft(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dynamic Fine-Tuning's per-token loss (arXiv 2508.05629): sg(p) * NLL.

    Each target token's NLL is scaled by the model's own probability of that token,
    p = exp(-NLL), detached, so the gradient is p * grad(NLL): confident tokens keep their full
    step, improbable ones are damped. Averaged over target tokens, as TRL's `loss_type="dft"` and
    LLaMA-Factory's `use_dft_loss` take it (`mean_token_loss(..., dft)`).
    """
    values = nll(logits, targets)
    return values * torch.exp(-values.detach())


def mean_token_loss(
    logits: Logits | torch.Tensor,
    labels: torch.Tensor,
    per: Normalization = "token",
    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nll,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """A next-token loss (`nll` by default, or `dft`) summed over target tokens, in nats per token
    (or per sequence: `per`)."""
    return chunked_target_mean(per_token, labels, logits, next_targets(labels), chunk_size=chunk_size, per=per)


def token_nll(logits: Logits | torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) and the number of target tokens."""
    valid = target_positions(labels)
    return head_sum(nll, logits, valid, next_targets(labels)), valid.sum()
