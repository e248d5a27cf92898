"""Right-padding of token sequences into a training batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..tokens import IGNORE_INDEX, pad_rows

def pad_batch(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest row: `input_ids`, `attention_mask`, `labels` (B, T) int64 tensors."""
    ids, mask = pad_rows(input_ids, pad_id)
    lab, labelled = pad_rows(labels, IGNORE_INDEX)
    if not torch.equal(mask, labelled):
        raise ValueError("each row's labels must be as long as its input_ids")
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def pad_topk(rows: Sequence[dict], width: int) -> dict[str, torch.Tensor]:
    """(B, T, k) `topk_ids` (int64) and `topk_logprobs` (float32) from replay rows; position t holds
    the base model's top-k over token t + 1, padding positions hold zeros (they carry no label)."""
    k = len(rows[0]["topk_ids"][0])
    ids = torch.zeros((len(rows), width, k), dtype=torch.long)
    logprobs = torch.zeros((len(rows), width, k), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = len(row["topk_ids"])
        if n:
            ids[i, :n] = torch.as_tensor(np.stack(row["topk_ids"]), dtype=torch.long)
            logprobs[i, :n] = torch.as_tensor(np.stack(row["topk_logprobs"]), dtype=torch.float32)
    return {"topk_ids": ids, "topk_logprobs": logprobs}


class Collator:
    """Collate rows of `input_ids` (and `labels`, else every token is a target; and the cached
    top-k columns of replay rows when present).

    With `stream` set, the batch comes wrapped as `{stream: batch}`: validation loaders run one
    after another, and the wrapper tells the module which stream a batch belongs to.
    """

    def __init__(self, pad_id: int, stream: str | None = None) -> None:
        self.pad_id, self.stream = pad_id, stream

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows] if "labels" in rows[0] else ids
        batch = pad_batch(ids, labels, self.pad_id)
        if "topk_ids" in rows[0]:
            batch.update(pad_topk(rows, batch["input_ids"].size(1)))
        return batch if self.stream is None else {self.stream: batch}
