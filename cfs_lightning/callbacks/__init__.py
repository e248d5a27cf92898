"""Callbacks: retained-task evaluation, online replay and the Hugging Face export."""

from .export import HFExport
from .online_replay import OnlineReplay
from .retained_eval import RetainedEval

__all__ = ["HFExport", "OnlineReplay", "RetainedEval"]
