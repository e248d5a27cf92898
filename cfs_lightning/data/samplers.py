"""Training samplers whose order is a function of (seed, epoch, rank), so a resumed run sees the
same batches as an uninterrupted one.

Both are `DistributedSampler`s that know their rank, so Lightning does not wrap them in a sampler
of its own, and both can be told to start an epoch part-way (`resume`): the first iteration of
that epoch skips the items already trained on, without loading them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class _Resumable:
    """A one-shot skip of the first `items` indices of epoch `epoch`."""

    epoch: int
    _resume: tuple[int, int] | None = None

    def resume(self, epoch: int, items: int) -> None:
        """Make the next iteration, if it is for `epoch`, skip its first `items` indices."""
        self._resume = (epoch, items)

    def _skipping(self, indices: Iterator[int]) -> Iterator[int]:
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            return itertools.islice(indices, resume[1], None)
        return indices


class TaskSampler(_Resumable, DistributedSampler):
    """This rank's share of a shuffle of the task data, reshuffled every epoch from (seed, epoch)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def __iter__(self) -> Iterator[int]:
        return self._skipping(super().__iter__())


class CyclingSampler(_Resumable, DistributedSampler):
    """This rank's share of an endless stream of shuffled passes over `n` items, cut into epochs.

    Pass k is a permutation seeded by (seed, k). Epoch e covers stream items
    [e * W * num_samples, (e + 1) * W * num_samples) for W ranks, of which rank r takes every W-th
    from the r-th: `num_samples` per rank and epoch. Replay therefore cycles when exhausted, continues
    across epochs where it left off, and every item is seen once before any is seen twice.
    """

    def __init__(self, n: int, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if n < 1:
            raise ValueError("CyclingSampler needs at least one item")
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.n, self.num_samples = n, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        world = self.num_replicas
        start = self.epoch * self.num_samples * world
        mine = itertools.islice(self._stream(start), self.rank, self.num_samples * world, world)
        return self._skipping(mine)

    def _stream(self, start: int) -> Iterator[int]:
        pass_index, offset = divmod(start, self.n)
        while True:
            yield from self._permutation(pass_index)[offset:].tolist()
            pass_index, offset = pass_index + 1, 0

    def _permutation(self, pass_index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return torch.randperm(self.n, generator=gen)
