"""Per-token full-vocabulary divergence to the frozen reference (arXiv 2505.13811, 2605.26097)."""

from __future__ import annotations

from typing import Literal

import torch

from ...streams import ONPOLICY, REPLAY, TASK
from ..heads import Logits
from ..losses import chunked_target_mean, token_divergence
from .base import Regularizer


class KLToReference(Regularizer):
    """Mean per-token divergence between the frozen reference and the trainable model.

    On replay sequences (`on="replay"`) every non-padding next-token position counts; on task
    data (`on="task"`) and on on-policy samples (`on="onpolicy"`) only the response positions
    (those with a label). See `token_divergence`
    for `direction`, `beta` and `temperature`. Needs the module's frozen reference (built
    automatically: a frozen copy, or the LoRA model with adapters off).

    Memory: the reference contributes its (B, T, H) final hidden states; the divergence is formed
    `chunk_size` target tokens at a time (`heads.head_sum`), both models' heads applied to one
    chunk, so the peak extra memory is a few chunk x V float32 values (the reference's logits,
    log p_ref and p_ref, `_ForwardKL`; more for the reverse KL and the JSD); neither model's
    (B, T, V) logits exist.
    """

    needs_reference = True

    def __init__(
        self,
        weight: float = 1.0,
        on: Literal["replay", "task", "onpolicy"] = REPLAY,
        direction: Literal["forward", "reverse"] = "forward",
        beta: float | None = None,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        name: str | None = None,
    ) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            on: Batch stream to compare on: `replay` (all tokens), `task` (response tokens) or
                `onpolicy` (the responses `OnlineReplay(sampler: trainable, prompts: task,
                stream: onpolicy)` samples from the current weights). Quote the key in YAML
                (`"on": task`): YAML 1.1 reads a bare `on` as true.
            direction: `forward` = KL(p_ref || p_theta), `reverse` = KL(p_theta || p_ref).
            beta: Generalised JSD interpolation in [0, 1] (TRL GKD convention); overrides
                `direction`, so leave that at `forward` when setting it. The term jumps at both
                ends: JSD_beta tends to 0 as beta -> 0 or 1 (M tends to one of the two
                distributions), but beta=0 and beta=1 are the forward and reverse KLs
                themselves (`token_divergence`).
            temperature: Both distributions are softened by this temperature.
            chunk_size: Target tokens per chunk of the divergence; None: sized by the vocabulary
                (`heads.LOGITS_PER_CHUNK` logits at once).
            name: Log key suffix; default `kl_to_reference`.
        """
        super().__init__(weight, name)
        if on not in (REPLAY, TASK, ONPOLICY):
            raise ValueError(f"KLToReference.on must be 'replay', 'task' or 'onpolicy', got {on!r}")
        if direction not in ("forward", "reverse"):
            raise ValueError(f"KLToReference.direction must be 'forward' or 'reverse', got {direction!r}")
        if beta is not None and not 0 <= beta <= 1:
            raise ValueError(f"KLToReference.beta must be in [0, 1] or None, got {beta}")
        if beta is not None and direction != "forward":
            raise ValueError("KLToReference: give either beta (generalised JSD) or direction, not both")
        if temperature <= 0:
            raise ValueError(f"KLToReference.temperature must be > 0, got {temperature}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"KLToReference.chunk_size must be >= 1 or None, got {chunk_size}")
        self.on, self.direction, self.beta = on, direction, beta
        self.temperature, self.chunk_size = temperature, chunk_size
        self.streams = (on,)
        self.reference = None

    def setup(self, module) -> None:
        self.reference = module.reference

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        b = batch[self.on]
        hidden = self.reference.hidden_states(b["input_ids"], b["attention_mask"])
        return self.divergence(outputs[self.on], hidden, b["labels"])

    def divergence(self, logits: Logits | torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean divergence over target positions, from trainable logits and reference hidden states.

        Args:
            logits: The trainable model's `Logits` (or (B, T, V) logits); position t predicts
                labels[:, t + 1].
            hidden: (B, T, H) reference hidden states; `self.reference.logits` maps them to logits.
            labels: (B, T) targets, IGNORE_INDEX where no loss is taken.
        """
        return chunked_target_mean(self._per_token, labels, logits, hidden, chunk_size=self.chunk_size,
                                   per=self.normalize)

    def _per_token(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ref_logits = self.reference.logits(hidden)  # (chunk, V), no grad
        return token_divergence(logits, ref_logits, self.direction, self.beta, self.temperature)
