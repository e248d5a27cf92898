"""Dynamic Fine-Tuning, DFT (arXiv 2508.05629): each response token's NLL weighted by the model's
own detached probability of it."""

from __future__ import annotations

import torch

from ..losses import nll
from .base import TaskLoss


def dft(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DFT's per-token loss, sg(p) * NLL, of (N, V) logits and (N,) targets.

    Each target token's NLL is scaled by the model's own probability of that token,
    p = exp(-NLL), detached, so the gradient is p * grad(NLL): confident tokens keep their full
    step, improbable ones are damped.
    """
    values = nll(logits, targets)
    return values * torch.exp(-values.detach())


class DFT(TaskLoss):
    """DFT's loss averaged over the response tokens, as TRL's `loss_type="dft"` and
    LLaMA-Factory's `use_dft_loss` take it; logged as `train/task_dft`.

    ASFT (arXiv 2509.23753) is DFT plus `KLToReference(on: task)`: configs/toy/methods/asft.yaml.
    """

    name = "dft"

    def per_token(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return dft(logits, targets)
