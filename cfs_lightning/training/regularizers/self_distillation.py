"""Self-distillation fine-tuning, SDFT (arXiv 2601.19897): on-policy distillation from the model
shown the task's demonstration in its context."""

from __future__ import annotations

from typing import Literal

import torch

from ...streams import ONPOLICY, ONPOLICY_TEACHER, missing_streams
from ...tokens import eval_mode
from ..heads import Logits, as_logits, rows_sum
from ..losses import normalizer, target_positions, token_divergence
from .base import Regularizer

TEACHERS = ("base", "live")


def response_positions(labels: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """(B, T) `target_positions` less each row's first `skip`."""
    valid = target_positions(labels)
    return valid & (valid.cumsum(1) > skip) if skip else valid


class SelfDistillation(Regularizer):
    """Per-token divergence between the model on its own response and a teacher that sees the
    task's demonstration first (SDFT, arXiv 2601.19897; TRL `trl.experimental.sdft`).

    The rows come from `OnlineReplay(sampler: trainable, prompts: task, stream: onpolicy,
    demonstrations: true)`: the student row is a task prompt and the response the current weights
    sampled for it; the teacher row (stream `onpolicy_teacher`) is the same prompt and response
    after the task example itself (prompt and reference response) as a one-shot demonstration.
    On every response token the term is the divergence between the student's next-token
    distribution and the teacher's (`token_divergence`, with the teacher in the reference's
    place: `direction: reverse` is KL(p_student || p_teacher), the paper's objective, and
    `beta` the generalised JSD of TRL's `distillation_alpha`). The teacher's side carries no
    gradient. With `model.task_loss: null` this is SDFT, which learns the task only through the
    teacher (configs/toy/methods/sdft.yaml); with the NLL task loss it is an added term.

    Teachers: `base`, the frozen initial weights (TRL's default; needs the module's reference),
    or `live`, the current weights (a zero-lag self-teacher). An EMA teacher (TRL's third kind)
    is not offered: it needs a third set of weights, updated every step, beside the trained
    ones and the reference.
    """

    streams = (ONPOLICY,)
    reads = (ONPOLICY, ONPOLICY_TEACHER)

    def __init__(
        self,
        weight: float = 1.0,
        teacher: Literal["base", "live"] = "base",
        direction: Literal["forward", "reverse"] = "reverse",
        beta: float | None = None,
        temperature: float = 1.0,
        skip_tokens: int = 0,
        chunk_size: int | None = None,
        name: str | None = None,
    ) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            teacher: `base` (the frozen reference with the demonstration in context) or `live`
                (the weights being trained, with the demonstration in context, in eval mode
                and without gradient).
            direction: `reverse` = KL(p_student || p_teacher) (the paper's), `forward` =
                KL(p_teacher || p_student).
            beta: Generalised JSD in [0, 1] instead of a KL (beta=0 forward, 1 reverse, as in
                TRL); leave `direction` at its default when setting it. The term jumps at both
                ends: JSD_beta tends to 0 as beta -> 0 or 1, but beta=0 and beta=1 are the
                KLs themselves (`token_divergence`).
            temperature: Both distributions are softened by this temperature.
            skip_tokens: The first response tokens of each row that take no loss (TRL
                `num_loss_tokens_to_skip`).
            chunk_size: Target tokens per chunk of the divergence; None: sized by the vocabulary.
            name: Log key suffix; default `self_distillation`.
        """
        super().__init__(weight, name)
        if teacher not in TEACHERS:
            raise ValueError(f"SelfDistillation.teacher must be one of {TEACHERS}, got {teacher!r}")
        if direction not in ("forward", "reverse"):
            raise ValueError(f"SelfDistillation.direction must be 'forward' or 'reverse', got {direction!r}")
        if beta is not None and not 0 <= beta <= 1:
            raise ValueError(f"SelfDistillation.beta must be in [0, 1] or None, got {beta}")
        if beta is not None and direction != "reverse":
            raise ValueError("SelfDistillation: give either beta (generalised JSD) or direction, not both")
        if temperature <= 0:
            raise ValueError(f"SelfDistillation.temperature must be > 0, got {temperature}")
        if skip_tokens < 0:
            raise ValueError(f"SelfDistillation.skip_tokens must be >= 0, got {skip_tokens}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"SelfDistillation.chunk_size must be >= 1 or None, got {chunk_size}")
        self.teacher, self.direction, self.beta = teacher, direction, beta
        self.temperature, self.skip_tokens, self.chunk_size = temperature, skip_tokens, chunk_size
        self.needs_reference = teacher == "base"
        self.reference, self._module = None, None

    def setup(self, module) -> None:
        self.reference, self._module = module.reference, module

    def _live_teacher(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Logits:
        """The `Logits` of the weights being trained, in eval mode (dropout off, as a teacher runs
        in TRL) and without gradient; the model's train mode is restored after."""
        with torch.no_grad(), eval_mode(self._module.model):
            return self._module.logits(input_ids, attention_mask)

    def __call__(self, batch: dict, outputs: dict[str, Logits]) -> torch.Tensor:
        missing = missing_streams({self.name: self.reads}, batch)
        if missing:  # the module checks every term's streams first; called alone, say it here
            raise KeyError(missing)
        student, teacher = batch[ONPOLICY], batch[ONPOLICY_TEACHER]
        s_pos = response_positions(student["labels"], self.skip_tokens)
        t_pos = response_positions(teacher["labels"], self.skip_tokens)
        if not torch.equal(s_pos.sum(1), t_pos.sum(1)):
            raise ValueError("SelfDistillation: the student and teacher rows have different response lengths")
        if self.teacher == "base":
            states = self.reference.hidden_states(teacher["input_ids"], teacher["attention_mask"])
            head = self.reference.logits
        else:
            live = self._live_teacher(teacher["input_ids"], teacher["attention_mask"])
            states, head = live.hidden, live.head

        def per_token(chunk: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                ref = head(teacher_chunk) if head is not None else teacher_chunk
            return token_divergence(chunk, ref, self.direction if self.beta is None else "forward",
                                    self.beta, self.temperature)

        # The teacher's rows at its response positions, the student's at its own: both row-major,
        # the same tokens in the same order.
        student_logits = as_logits(outputs[ONPOLICY])
        total = rows_sum(per_token, student_logits, student_logits.hidden[s_pos], states[t_pos],
                         chunk_size=self.chunk_size)
        return total / normalizer(s_pos, self.normalize)
