"""Replay settings for training: the replay directory and its held-out slice."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_passes: int | None = None
    """Refuse a fit that would show any replay sequence more than this many times (the replay
    cycles once exhausted, and a small set seen over and over is memorised rather than anchoring
    the model); None: no limit. The number of passes is logged either way."""
    strict: bool = True
    """Refuse shards whose manifest names another base model than the one being fine-tuned
    (a different tokenizer is always refused)."""

    def __post_init__(self) -> None:
        if self.max_passes is not None and self.max_passes < 1:
            raise ValueError(f"replay.max_passes must be >= 1 or null, got {self.max_passes}")
        if self.val_size < 0:
            raise ValueError(f"replay.val_size must be >= 0, got {self.val_size}")
