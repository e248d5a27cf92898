"""The DataModule: task batches interleaved with replay read from shards, at a fixed ratio."""

from .collate import Collator, pad_batch
from .datamodule import ReplayDataModule, replay_batch_size
from .replay import ReplayConfig
from .samplers import CyclingSampler, TaskSampler

__all__ = ["Collator", "CyclingSampler", "ReplayConfig", "ReplayDataModule", "TaskSampler", "pad_batch",
           "replay_batch_size"]
