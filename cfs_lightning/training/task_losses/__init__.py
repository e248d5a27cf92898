"""Task losses: the loss on the task's response tokens, one small file each, chosen in YAML by
`model.task_loss: {class_path: ...}` (`null`: none, the regularizers are the whole loss)."""

from .base import TASK_LOSS_KEY, TaskLoss, check_task_loss, task_terms
from .dft import DFT
from .eaft import EAFT
from .nll import NLL

__all__ = ["DFT", "EAFT", "NLL", "TASK_LOSS_KEY", "TaskLoss", "check_task_loss", "task_terms"]
