"""Entropy-adaptive fine-tuning, EAFT (arXiv 2601.02151): each response token's NLL weighted by
the model's own normalised entropy at that position, detached."""

from __future__ import annotations

import math

import torch

from ..losses import nll
from .base import TaskLoss


def topk_entropy_weight(logits: torch.Tensor, k: int = 20, alpha: float = 1.0) -> torch.Tensor:
    """(N,) EAFT's weight, (H_k / log k) ** alpha, of (N, V) logits; no gradient.

    H_k is the entropy in nats of the softmax over each row's k largest logits (all V when
    V < k), so H_k / log k lies in [0, 1]: 1 where those k are equally likely, near 0 where the
    model is sure of one token.
    """
    k = min(k, logits.shape[-1])
    with torch.no_grad():
        top = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).topk(k, dim=-1).values
        logp = top.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return (entropy / math.log(k)).clamp(0.0, 1.0).pow(alpha)


class EAFT(TaskLoss):
    """EAFT's loss averaged over the response tokens, as LLaMA-Factory's `use_eaft_loss` /
    `eaft_alpha` and Axolotl's `use_eaft` / `eaft_alpha` / `eaft_k` take it; logged as
    `train/task_eaft`.

    A token the model predicts with low entropy is one it is sure of; when the target disagrees
    (a "confident conflict", which the paper finds drives forgetting), the weight is small and
    the step on it is damped. Uncertain positions keep nearly the full NLL step. The weights never
    exceed 1, so `train/task_eaft` <= `train/task_loss`.
    """

    name = "eaft"

    def __init__(self, alpha: float = 1.0, k: int = 20) -> None:
        """
        Args:
            alpha: Exponent of the normalised entropy; 0 is the plain NLL.
            k: Largest logits per position that the entropy is taken over (the peers' 20).
        """
        if alpha < 0:
            raise ValueError(f"EAFT.alpha must be >= 0, got {alpha}")
        if k < 2:
            raise ValueError(f"EAFT.k must be >= 2 (the entropy of one logit is 0), got {k}")
        self.alpha, self.k = alpha, k

    def per_token(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nll(logits, targets) * topk_entropy_weight(logits, self.k, self.alpha)

    def __repr__(self) -> str:
        return f"EAFT(alpha={self.alpha}, k={self.k})"
