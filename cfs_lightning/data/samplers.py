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
    """This rank's share of a shuffle of the task data, reshuffled every epoch from (seed, epoch).

    With `lengths` and `batch_size`, batches are grouped by length (Hugging Face Trainer's
    `group_by_length`): the shuffle is cut into windows of 64 batches, each window is sorted by
    length so that a batch holds sequences of similar length and pads little, and the batches are
    put in a shuffled order again. Every rank gets its share of the same batches, so the step's
    sequences stay alike across ranks too.
    """

    GROUP_BATCHES = 64

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 lengths: list[int] | None = None, batch_size: int | None = None) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if lengths is not None and (batch_size is None or len(lengths) != n):
            raise ValueError("TaskSampler: lengths needs batch_size and one length per item")
        self.lengths, self.batch_size = lengths, batch_size

    def __iter__(self) -> Iterator[int]:
        if self.lengths is None:
            return self._skipping(super().__iter__())
        return self._skipping(iter(self._grouped()[self.rank:self.total_size:self.num_replicas]))

    def _grouped(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        if self.drop_last:
            order = order[:self.total_size]
        else:  # as DistributedSampler: repeat from the start to a multiple of the ranks
            order += order[:self.total_size - len(order)]
        step = self.batch_size * self.num_replicas  # one batch of every rank
        window = step * self.GROUP_BATCHES
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[k:k + step] for k in range(0, len(chunk), step)]
        # the short last batch stays last, as in an ungrouped epoch
        full = [b for b in batches if len(b) == step]
        rest = [b for b in batches if len(b) != step]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        return [i for b in shuffled + rest for i in b]


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
