"""The regularizer interface: a weighted scalar term added to the task loss."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..module import CausalLMFineTuner


def _snake_case(name: str) -> str:
    """`NLLReplay` -> `nll_replay`, `KLToReference` -> `kl_to_reference`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Regularizer:
    """One term of the fine-tuning objective: loss = task_loss + sum_i weight_i * term_i.

    Lifecycle, split from the math:
      - `setup(module)` runs once before training; snapshot what the term needs here (the initial
        weights theta_0, a handle on the frozen reference model, ...).
      - `__call__(batch, outputs)` returns the scalar term for one step. `batch` maps stream
        names ("task", "replay") to padded batches; `outputs` maps each stream listed in
        `streams` to the trainable model's (B, T, V) logits on it, computed once per step and
        shared by all regularizers.
      - `on_after_optimizer_step(module)` runs after every optimizer step (EMA-style averaging).

    Subclasses set `streams` to the batch streams whose logits they read.
    """

    streams: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            name: Log key suffix (`train/reg/<name>`); default: the class name in snake_case.
        """
        if weight < 0:
            raise ValueError(f"{type(self).__name__}.weight must be >= 0, got {weight}")
        self.weight = weight
        self.name = name or _snake_case(type(self).__name__)

    def setup(self, module: CausalLMFineTuner) -> None:
        """Called once with the LightningModule before training starts."""

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def on_after_optimizer_step(self, module: CausalLMFineTuner) -> None:
        """Called after every optimizer step."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, name={self.name!r})"
