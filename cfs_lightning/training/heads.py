"""A causal LM with its output head split off: the final hidden states from one forward pass, and
the head that maps any rows of them to logits, so that losses form logits a chunk at a time.

A stream's next-token logits are a `Logits`: the final hidden states (B, T, H) and the output
head that maps them to logits (or, where the head cannot be split off, the (B, T, V) logits
themselves). `head_sum` sums a per-token function of the logits over a batch's chosen positions:
the rows of those positions are gathered, and the head and the function run on `chunk` of them
at a time. With gradients on, each chunk's gradients with respect to its hidden states and the
head's parameters are formed right there (`_ChunkedHead`), so the logits of a chunk, and
everything the function derives from them, are freed before the next chunk: at most about
`LOGITS_PER_CHUNK` logits exist at once, and the head runs once forward and twice backward per
token, as it does in the unchunked step. Only the chosen positions reach the head: prompt and
padding positions cost nothing there.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..tokens import eval_mode

log = logging.getLogger(__name__)

LOGITS_PER_CHUNK = 2**26
"""Logits formed at once by default (256 MiB in float32): the chunk holds this many divided by the
vocabulary size tokens, e.g. 1,365 for SmolLM2's 49,152 and 256 for Gemma 3's 262,144."""


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
    return rows_sum(per_token, logits, logits.hidden[positions], *(x[positions] for x in inputs),
                    chunk_size=chunk_size)


def rows_sum(
    per_token: Callable[..., torch.Tensor],
    logits: Logits,
    hidden: torch.Tensor,
    *rows: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over rows of `per_token(logits.head(hidden row), *rows at it)`: `head_sum` on rows
    already gathered ((N, H) `hidden` of `logits`, (N, ...) `rows`), so that a caller whose inputs
    sit at other positions than its targets (the teacher's view in self-distillation) gathers each
    once."""
    # Under no_grad nothing is differentiated: no input is marked as needing a gradient.
    params = [p for p in logits.params if p.requires_grad] if torch.is_grad_enabled() else []
    hidden = hidden if torch.is_grad_enabled() else hidden.detach()
    return _ChunkedHead.apply(per_token, logits.head, chunk_tokens(logits.vocab, chunk_size), len(rows),
                              hidden, *rows, *params)


def postprocess_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What the model's forward does to its head's output: Gemma 2's (and any model's with
    `final_logit_softcapping`) soft-capping, cap * tanh(logits / cap)."""
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def backbone(causal_lm: nn.Module) -> nn.Module:
    """The transformer body under the head (`model`, `transformer`, `gpt_neox`, ...)."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


def splits_head(causal_lm: nn.Module) -> bool:
    """Whether the model's forward can skip its head (`logits_to_keep`, transformers' own)."""
    return "logits_to_keep" in inspect.signature(causal_lm.forward).parameters


class OutputHead:
    """The trainable model's head as a function of (N, H) hidden states, post-processing included."""

    def __init__(self, causal_lm: nn.Module) -> None:
        self.lm = causal_lm

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return postprocess_logits(self.lm.config, self.lm.get_output_embeddings()(hidden))


def split_logits(model: nn.Module, causal_lm: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> Logits:
    """The model's logits on a batch as (B, T, H) final hidden states and its head.

    `model` is what is called (the causal LM itself, or a peft wrapper around `causal_lm`); its
    forward runs as usual, FSDP hooks included, but projects no position (`logits_to_keep` an
    empty index), and the body's output is read by a forward hook. The head's parameters are read
    after the forward, so under FSDP2 they are the gathered ones (the root unit stays gathered
    until the backward pass).
    """
    captured = []
    handle = backbone(causal_lm).register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=none)
    finally:
        handle.remove()
    head = causal_lm.get_output_embeddings()
    return Logits(captured[0], OutputHead(causal_lm), tuple(head.parameters()), head.weight.shape[0])


def reproduces_logits(causal_lm: nn.Module, hidden_of, head_of) -> bool:
    """Whether `head_of(hidden_of(ids, mask))` gives the model's own logits.

    The head's output is scaled to logits of about 50 (a hook on the head, in both paths), where
    soft-capping or a logit scale changes the values: a random model's logits are near 0, where a
    missing post-processing step would go unnoticed.

    Args:
        causal_lm: The transformers model.
        hidden_of: (ids, mask) -> (B, T, H) final hidden states, without gradient.
        head_of: (B, T, H) -> (B, T, V) logits, without gradient.
    """
    ids = torch.arange(4, device=next(causal_lm.parameters()).device).unsqueeze(0)
    mask = torch.ones_like(ids)
    head = causal_lm.get_output_embeddings()
    with torch.no_grad():
        hidden = hidden_of(ids, mask)
        scale = 50.0 / head(hidden).abs().amax().float().clamp_min(1e-6)
    handle = head.register_forward_hook(lambda module, args, out: out * scale)
    try:
        with torch.no_grad():
            full = causal_lm(input_ids=ids, attention_mask=mask).logits
            split = head_of(hidden)
    finally:
        handle.remove()
    return torch.allclose(full.float(), split.float(), atol=1e-3, rtol=1e-4)


def head_splits(model: nn.Module, causal_lm: nn.Module) -> bool:
    """Whether the losses can run the output head themselves: the model's forward can skip its
    head and the split reproduces its logits (soft-capping included). Where not (a model
    without `logits_to_keep`, a post-processing step cfs_lightning does not know), the (B, T, V)
    logits are formed, and the losses still run a chunk of them at a time.

    Args:
        model: What is called (the causal LM, or a peft wrapper around `causal_lm`).
        causal_lm: The transformers model.
    """
    if not splits_head(causal_lm):
        log.info("%s takes no logits_to_keep: training forms its (B, T, V) logits", type(causal_lm).__name__)
        return False
    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return split_logits(model, causal_lm, ids, mask).hidden

    with eval_mode(model):
        if reproduces_logits(causal_lm, hidden, OutputHead(causal_lm)):
            return True
    log.info("%s post-processes its logits in a way cfs_lightning does not know: training forms "
             "its (B, T, V) logits", type(causal_lm).__name__)
    return False
