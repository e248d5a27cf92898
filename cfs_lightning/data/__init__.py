"""Task data, replay shards, and the DataModule that interleaves them."""

from .collate import IGNORE_INDEX, Collator, pad_batch
from .datamodule import ReplayDataModule, replay_batch_size
from .replay import CyclingSampler, ReplayConfig, ReplayGeneration
from .task import TaskDataError, TaskSource

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "CyclingSampler",
    "ReplayConfig",
    "ReplayDataModule",
    "ReplayGeneration",
    "TaskDataError",
    "TaskSource",
    "pad_batch",
    "replay_batch_size",
]
