"""A causal LM with its output head split off: the final hidden states from one forward pass, and
the head that maps any rows of them to logits, so that losses form logits a chunk at a time
(`losses.Logits`)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .losses import Logits


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
