"""Right-padding of token sequences into a training batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt and padding); torch's cross_entropy default."""


def pad_batch(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest row: `input_ids`, `attention_mask`, `labels` (B, T) int64 tensors."""
    width = max(len(row) for row in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, (row, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
        ids[i, : len(row)] = torch.as_tensor(row)
        lab[i, : len(row)] = torch.as_tensor(row_labels)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class Collator:
    """Collate rows of `input_ids` (and `labels`, else every token is a target).

    With `stream` set, the batch comes wrapped as `{stream: batch}`: validation loaders run one
    after another, and the wrapper tells the module which stream a batch belongs to.
    """

    def __init__(self, pad_id: int, stream: str | None = None) -> None:
        self.pad_id, self.stream = pad_id, stream

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows] if "labels" in rows[0] else ids
        batch = pad_batch(ids, labels, self.pad_id)
        return batch if self.stream is None else {self.stream: batch}
