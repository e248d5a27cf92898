"""Regularizers: one file each, composed as a list on the LightningModule."""

from .base import Regularizer
from .nll_replay import NLLReplay

__all__ = ["NLLReplay", "Regularizer"]
