"""The task-loss interface: a per-token loss on the task's response tokens, averaged over them."""

from __future__ import annotations

import torch

from ..heads import Logits
from ..losses import Normalization, mean_token_loss

TASK_LOSS_KEY = "train/task_loss"
"""The plain NLL of the task's response tokens: every run logs it, whatever its objective, so
that runs compare."""


class TaskLoss:
    """The loss on the `task` stream's target tokens: `per_token` of each target token's logits,
    summed over the targets and divided as every term is (`losses.mean_token_loss`, by the
    module's `normalize`).

    A new task loss is one small file: a subclass that sets `name` and writes `per_token`,
    selected with `model.task_loss: {class_path: ...}`. Its value is logged as
    `train/task_<name>`, beside `train/task_loss` (the plain NLL).
    """

    name: str = ""
    """Log key suffix: `train/task_<name>`."""

    @property
    def key(self) -> str:
        """The key its value is logged under."""
        if not self.name:
            raise ValueError(f"{type(self).__name__} sets no `name`: its value is logged as train/task_<name>")
        return f"train/task_{self.name}"

    def per_token(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N,) loss in nats of (N, V) logits (a chunk of target tokens) and their (N,) targets."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_token")

    def __call__(self, logits: Logits | torch.Tensor, labels: torch.Tensor,
                 per: Normalization = "token") -> torch.Tensor:
        """The mean over the (B, T) `labels`' target tokens (per token, or per sequence: `per`)."""
        return mean_token_loss(logits, labels, per, self.per_token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_task_loss(task_loss: object, terms: bool) -> None:
    """Refuse a `model.task_loss` that is not a `TaskLoss`, or none (`null`) without a regularizer
    that adds a term (`terms`) to train on."""
    if task_loss is not None and not isinstance(task_loss, TaskLoss):
        raise ValueError("model.task_loss must be a TaskLoss (class_path: cfs_lightning.training."
                         f"task_losses.NLL, DFT, ...) or null, got {task_loss!r}")
    if task_loss is None and not terms:
        raise ValueError("model.task_loss: null leaves no loss without a regularizer that adds a term "
                         "(e.g. SelfDistillation); add one, or set a task loss (task_losses.NLL, DFT)")


def task_terms(task_loss: TaskLoss | None, logits: Logits | torch.Tensor, labels: torch.Tensor,
               per: Normalization) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The task's logged values and its term of the loss (None without a task loss).

    `train/task_loss` is the plain NLL whatever the task loss; the task loss whose key it is
    (`NLL`) is computed once, with its gradient; another one is logged under its own key and
    the NLL beside it without a gradient.
    """
    if task_loss is not None and task_loss.key == TASK_LOSS_KEY:
        value = task_loss(logits, labels, per)
        return {TASK_LOSS_KEY: value}, value
    with torch.no_grad():
        logs = {TASK_LOSS_KEY: mean_token_loss(logits, labels, per)}
    if task_loss is None:
        return logs, None
    logs[task_loss.key] = task_loss(logits, labels, per)
    return logs, logs[task_loss.key]
