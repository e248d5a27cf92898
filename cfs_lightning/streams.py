"""The streams of a training batch: one name per kind of rows, defined here and nowhere else, and
the interface through which a stream's producers and its readers meet.

A training batch maps stream names to padded batches (`input_ids`, `attention_mask`, `labels`,
maybe cached top-k). Producers add rows to streams: the DataModule `task` and `replay` (through
its loaders), a callback that samples during the fit (`OnlineReplay`) `replay`, `onpolicy` and
`onpolicy_teacher` (asked for its rows at each batch's start). Readers (the task loss, the
regularizers) declare the streams, and the columns of them, that they read.

Neither side knows the other: each declares itself (`StreamProducer` here; a regularizer's
`streams`, `reads` and `needs_columns`), and the LightningModule checks the two sets of
declarations against each other when the fit starts, asks every producer for its rows each
step and merges the rows of one stream from several producers into one padded batch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this leaf imports no torch (`cfs report` reads its names)
    import torch

TASK = "task"
"""The task's examples (prompt and response; only the response tokens are targets)."""
REPLAY = "replay"
"""Replay sequences: cached shards (`cfs generate`, ...) or sampled online."""
ONPOLICY = "onpolicy"
"""The trainable model's own responses to task prompts, sampled during the fit."""
ONPOLICY_TEACHER = "onpolicy_teacher"
"""The teacher's view of each `onpolicy` row (its task example in context), row by row."""

CACHED_TOPK = ("topk_ids", "topk_logprobs")
"""The columns of replay rows that carry the base model's top-k next tokens and their
log-probabilities (`cfs generate --store_topk K`); sampled rows carry none."""

HOW_TO_ADD = {
    TASK: "give the DataModule a task (data.task)",
    REPLAY: "give the DataModule replay shards (data.replay.dir) and data.replay_ratio > 0, or add a "
            "callback that adds replay rows (OnlineReplay)",
    ONPOLICY: "add the callback that samples it, OnlineReplay(sampler: trainable, prompts: task, "
              "stream: onpolicy)",
    ONPOLICY_TEACHER: "add OnlineReplay(sampler: trainable, prompts: task, stream: onpolicy, "
                      "demonstrations: true) to the trainer's callbacks",
}
"""Where each stream comes from, for the error that names a stream a reader needs and no
producer adds."""

Batch = dict[str, "torch.Tensor"]
"""One stream's padded batch: (B, T) `input_ids`, `attention_mask`, `labels`, maybe more columns."""


def missing_streams(readers: Mapping[str, Collection[str]], present: Collection[str],
                    where: str = "the batch has") -> str | None:
    """The error for streams some reader needs and `present` lacks, naming where each comes from;
    None when nothing is missing.

    Args:
        readers: Reader name -> the streams it reads.
        present: The streams there are.
        where: What holds `present`: `the batch has`, `the producers add`.
    """
    missing = {s for streams in readers.values() for s in streams} - set(present)
    if not missing:
        return None
    users = [name for name, streams in readers.items() if set(streams) & missing]
    fixes = "; ".join(HOW_TO_ADD.get(s, f"add a producer of `{s}`") for s in sorted(missing))
    return f"{users} need the {sorted(missing)} stream, but {where} only {sorted(present)}: {fixes}"


@dataclass(frozen=True)
class StepContext:
    """Where a training batch sits in the fit: what a producer seeds and pools its rows by."""

    global_step: int
    """Optimizer steps taken so far."""
    batch_idx: int
    """The batch's index in its epoch."""
    accumulation: int
    """Micro-batches per optimizer step (`trainer.accumulate_grad_batches`)."""
    rank: int
    """This process's rank."""
    world_size: int
    """The number of processes."""

    @property
    def micro_batch(self) -> int:
        """The batch's place in its optimizer step. Every epoch starts a new step (Lightning steps
        on an epoch's last batch whatever the accumulation), so it counts from the epoch's start."""
        return self.batch_idx % self.accumulation


class StreamProducer:
    """Something that adds rows to streams of every training batch.

    Subclasses declare what they add; the module reads only these declarations:
      - `streams`: the streams it adds rows to (each must be read by some loss term);
      - `needs_reference`: it samples from the module's frozen reference, which is then built;
      - `carries(stream)`: the columns beyond `input_ids`, `attention_mask` and `labels` that its
        rows on `stream` hold (a reader that needs a column refuses a producer without it);
      - `describe()` and `how_to_stop(stream)`: itself as the configuration names it, and how to
        stop adding `stream`, for the errors that refuse a stream no term reads;
      - `rows(batch, step, module)`: the rows to add to this batch, per stream, as padded
        batches; the module merges them into the batch's streams (a producer never edits the
        batch). A DataModule's rows come through its loaders and it adds none here.
    """

    streams: tuple[str, ...] = ()
    needs_reference: bool = False

    def carries(self, stream: str) -> tuple[str, ...] | None:
        """The extra columns every row added to `stream` holds; None: not known before the rows
        are read (shards), so a reader finds out when it reads them."""
        return None

    def describe(self) -> str:
        """The producer as its configuration names it, e.g. `the OnlineReplay callback (stream: replay)`."""
        return type(self).__name__

    def how_to_stop(self, stream: str) -> str:
        """How to stop adding `stream`, e.g. `set data.replay_ratio to 0`."""
        return f"remove {self.describe()}"

    def rows(self, batch: Mapping[str, Batch], step: StepContext, module: Any) -> dict[str, Batch]:
        """Padded batches (on any device) to add to this training batch's streams.

        Args:
            batch: The batch as the loaders gave it (read its `task` prompts, ...; do not edit it).
            step: Where the batch sits in the fit.
            module: The LightningModule being trained: its `tokenizer`, frozen `reference` and
                `hf_model`, to sample from.
        """
        return {}
