"""Callbacks: retained-task evaluation and the Hugging Face export."""

from .export import HFExport
from .retained_eval import RetainedEval, load_task_yaml

__all__ = ["HFExport", "RetainedEval", "load_task_yaml"]
