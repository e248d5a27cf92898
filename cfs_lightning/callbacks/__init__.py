"""Callbacks: retained-task evaluation and the Hugging Face export."""

from .export import HFExport
from .retained_eval import RetainedEval, evaluate_lm, load_task_yaml, task_specs

__all__ = ["HFExport", "RetainedEval", "evaluate_lm", "load_task_yaml", "task_specs"]
