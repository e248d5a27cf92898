"""Task data, replay shards, and the DataModule that interleaves them."""

from .collate import IGNORE_INDEX, Collator, pad_batch
from .datamodule import ReplayDataModule, replay_batch_size
from .replay import ReplayConfig, ReplayGeneration
from .samplers import CyclingSampler, TaskSampler
from .task import TaskDataError, TaskSource

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "CyclingSampler",
    "ReplayConfig",
    "ReplayDataModule",
    "ReplayGeneration",
    "TaskSampler",
    "TaskDataError",
    "TaskSource",
    "pad_batch",
    "replay_batch_size",
]
