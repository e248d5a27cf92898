"""Regularizers: one file each, composed as a list on the LightningModule."""

from .base import Regularizer
from .ema import EMA
from .kl_cached_topk import KLFromCachedTopK, topk_forward_kl
from .kl_to_reference import KLToReference, token_divergence
from .l2_to_init import L2ToInit
from .nll_replay import NLLReplay
from .self_distillation import SelfDistillation

__all__ = ["EMA", "KLFromCachedTopK", "KLToReference", "L2ToInit", "NLLReplay", "Regularizer",
           "SelfDistillation", "token_divergence", "topk_forward_kl"]
