"""NLL on replay sequences: the context-free replay term of arXiv 2505.13811."""

from __future__ import annotations

import torch

from ...streams import REPLAY
from ..losses import mean_token_loss
from .base import Regularizer


class NLLReplay(Regularizer):
    """Mean NLL of the trainable model over every non-padding token of the replay batch (per
    token, or with `normalize: sequence` each sequence's summed NLL averaged over sequences).

    On sequences sampled from the base model this is a Monte Carlo estimate of
    KL(p_base || p_theta) plus the base model's entropy (a constant), so minimising it anchors the
    model to its old distribution.
    """

    streams = (REPLAY,)

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_token_loss(outputs[REPLAY], batch[REPLAY]["labels"], self.normalize)
