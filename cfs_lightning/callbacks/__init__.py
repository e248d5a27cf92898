"""Callbacks: retained-task evaluation and the Hugging Face export."""

from .export import HFExport
from ..evaluation import evaluate_lm, load_task_yaml, task_specs
from .retained_eval import RetainedEval

__all__ = ["HFExport", "RetainedEval", "evaluate_lm", "load_task_yaml", "task_specs"]
