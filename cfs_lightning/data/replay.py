"""Replay settings for training: the replay directory, its held-out slice, and how to generate it."""

from __future__ import annotations

from dataclasses import dataclass

from ..generation.sampler import Budget, SamplingConfig


@dataclass
class ReplayGeneration:
    """How `prepare_data` writes the replay directory when it is missing (as `cfs generate`)."""

    sampling: SamplingConfig
    """Sampling settings; see `cfs generate --help`."""
    budget: Budget
    """How much to generate; `fraction` counts task training examples."""
    shard_size: int = 10_000
    """Sequences per Arrow shard."""
    store_topk: int = 0
    """Also cache the base model's top-k next-token log-probabilities (for KLFromCachedTopK)."""


@dataclass
class ReplayConfig:
    """Replay shards read during fine-tuning."""

    dir: str
    """Replay directory written by `cfs generate` (Arrow shards + manifest.json)."""
    val_size: int = 256
    """Sequences held out from the end of the replay set for `val/replay_nll`; 0: none."""
    val_dir: str | None = None
    """Another replay directory to measure `val/replay_nll` on: its last `val_size` sequences,
    and nothing is held out of `dir`. Give every run the same context-free set here to compare
    the drift of runs trained on different replay sources (contextual, real text, dialogue)."""
    strict: bool = True
    """Refuse shards whose manifest names another base model than the one being fine-tuned
    (a different tokenizer is always refused)."""
    generate: ReplayGeneration | None = None
    """Generate the shards in `prepare_data` when `dir` has no manifest; None: refuse instead."""

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ValueError(f"replay.val_size must be >= 0, got {self.val_size}")
