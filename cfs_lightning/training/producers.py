"""The rows that stream producers add to a training batch: their declarations checked against the
terms that read them when the fit starts (`check_streams`), and their rows merged into the
batch's streams at the start of every training batch (`add_rows`, the one place where rows of
one stream from several producers become one padded batch).

Producers and readers only declare (`cfs_lightning.streams.StreamProducer`; a regularizer's
`streams`, `reads` and `needs_columns`): the module pairs them here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..streams import TASK, Batch, StreamProducer
from ..tokens import IGNORE_INDEX
from .regularizers import READERS, Regularizer

def check_streams(producers: Sequence[StreamProducer], regularizers: Sequence[Regularizer]) -> None:
    """Refuse what would be wasted or wrong every step: a stream a producer adds that no term
    reads (built, sampled or loaded, moved, and discarded), and rows without a column that a
    term reads on their stream (the merged stream keeps only the columns all its rows have).

    The task stream is always read: its NLL is logged whatever the objective.
    """
    terms = [r for r in regularizers if r.adds_term]
    read = {TASK}.union(*(r.reads for r in terms))
    for producer in producers:
        for stream in producer.streams:
            if stream not in read:
                names = [r.name for r in regularizers] or "none"
                readers = READERS.get(stream, "a regularizer that reads it")
                raise ValueError(
                    f"{producer.describe()} adds a `{stream}` stream to every training batch, but no "
                    f"regularizer reads it (regularizers: {names}); add {readers}, or "
                    f"{producer.how_to_stop(stream)}"
                )
    for term in terms:
        for stream, columns in term.needs_columns.items():
            for producer in (p for p in producers if stream in p.streams):
                carried = producer.carries(stream)
                if carried is not None and not set(columns) <= set(carried):
                    raise ValueError(
                        f"{type(term).__name__} needs {', '.join(columns)} on every `{stream}` row, but "
                        f"{producer.describe()} adds rows without them; use another term on `{stream}` "
                        f"({READERS.get(stream, 'one that reads no extra column')}), or "
                        f"{producer.how_to_stop(stream)}"
                    )


def merge_batches(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Two padded batches of one stream as one: `b`'s rows after `a`'s, right-padded to the wider.

    Only `input_ids`, `attention_mask` and `labels` are kept: a column that not every row carries
    (cached top-k) is dropped, which `check_streams` refuses for a term that reads it.
    """
    width = max(a["input_ids"].size(1), b["input_ids"].size(1))
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([F.pad(x[k], (0, width - x[k].size(1)), value=v) for x in (a, b)])
            for k, v in fill.items()}


def add_rows(batch: dict[str, Batch], produced: Sequence[Mapping[str, Batch]], pad_id: int,
             device: torch.device) -> None:
    """Merge each producer's rows (stream -> padded batch) into the training batch's streams, in
    place, on `device`: a stream the batch lacks is made of them, any other gets them appended."""
    for added in produced:
        for stream, rows in added.items():
            rows = {k: v.to(device) for k, v in rows.items()}
            batch[stream] = merge_batches(batch[stream], rows, pad_id) if stream in batch else rows
