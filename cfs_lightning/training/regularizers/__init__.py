"""Regularizers: one file each, composed as a list on the LightningModule."""

from ...streams import ONPOLICY, ONPOLICY_TEACHER, REPLAY
from .base import Regularizer
from .ema import EMA
from .kl_cached_topk import KLFromCachedTopK, topk_forward_kl
from .kl_to_reference import KLToReference
from .l2_to_init import L2ToInit
from .nll_replay import NLLReplay
from .self_distillation import SelfDistillation

READERS = {
    REPLAY: "NLLReplay, KLToReference (on: replay) or KLFromCachedTopK",
    ONPOLICY: "KLToReference (on: onpolicy) or SelfDistillation",
    ONPOLICY_TEACHER: "SelfDistillation, which reads the teacher's view",
}
"""The shipped terms that read each stream, for the error that refuses a stream nothing reads."""

__all__ = ["EMA", "KLFromCachedTopK", "KLToReference", "L2ToInit", "NLLReplay", "READERS", "Regularizer",
           "SelfDistillation", "topk_forward_kl"]
