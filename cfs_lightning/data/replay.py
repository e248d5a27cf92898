"""Replay data for training: a replay directory, its held-out slice, and a cycling sampler."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

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
    strict: bool = True
    """Refuse shards whose manifest names another base model than the one being fine-tuned
    (a different tokenizer is always refused)."""
    generate: ReplayGeneration | None = None
    """Generate the shards in `prepare_data` when `dir` has no manifest; None: refuse instead."""

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ValueError(f"replay.val_size must be >= 0, got {self.val_size}")


class CyclingSampler(Sampler[int]):
    """Indices of an endless stream of shuffled passes over `n` items, cut into epochs.

    Pass k is a permutation seeded by (seed, k). Epoch e yields stream items
    [e * num_samples, (e + 1) * num_samples), so replay cycles when exhausted and continues across
    epochs where it left off: every item is seen once before any is seen twice.
    """

    def __init__(self, n: int, num_samples: int, seed: int = 0) -> None:
        if n < 1:
            raise ValueError("CyclingSampler needs at least one item")
        self.n, self.num_samples, self.seed, self.epoch = n, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.num_samples
        pass_index, offset = divmod(start, self.n)
        emitted = 0
        while emitted < self.num_samples:
            perm = self._permutation(pass_index)[offset:]
            take = perm[: self.num_samples - emitted]
            yield from take.tolist()
            emitted += len(take)
            pass_index, offset = pass_index + 1, 0

    def _permutation(self, pass_index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return torch.randperm(self.n, generator=gen)
