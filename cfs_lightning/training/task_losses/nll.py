"""The response-masked NLL: supervised fine-tuning's task loss, and the default."""

from __future__ import annotations

import torch

from ..losses import nll
from .base import TASK_LOSS_KEY, TaskLoss


class NLL(TaskLoss):
    """Mean next-token NLL of the task's response tokens (nats per token, or per sequence)."""

    name = "nll"

    @property
    def key(self) -> str:
        """`train/task_loss` itself: the plain NLL every run logs, here trained on too."""
        return TASK_LOSS_KEY

    def per_token(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nll(logits, targets)
