"""Replay of real text: a corpus (`datasets` source or local text files) cut into replay shards.

The "pretraining data" baseline: when some of the original training text is at hand, replay it
instead of sampling. Documents are tokenized in order (shuffled first with `shuffle_seed`), each
followed by the tokenizer's document separator (`cfs_lightning.tokens.document_separator`:
`<|endoftext|>` for Qwen, whose EOS `<|im_end|>` ends a chat turn), packed end to end, and cut into sequences of `max_length` tokens that each begin
with the start token, the same layout as context-free samples, so the same `NLLReplay` trains on
them. The manifest records the corpus and the tokenizer (no model: the text is not sampled).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from ..loading import load_tokenizer
from ..sampling import Budget, GenerationError
from ..shards import ShardOutput, provenance, write_shards
from ..tasks import TaskSource
from ..tokens import document_separator, resolve_start_token


@dataclass
class CorpusSource:
    """Where the replay text lives."""

    path: str = "text"
    """`datasets.load_dataset` path: a hub dataset, or a builder (text, json, parquet) with `data_files`."""
    data_files: str | list[str] | dict[str, str] | None = None
    """Local files for a builder."""
    name: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Split to read; slicing works (`train[:10%]`)."""
    text_field: str = "text"
    """Column holding the documents."""
    shuffle_seed: int | None = None
    """Shuffle the documents with this seed before packing; None keeps the corpus order."""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `load_dataset` arguments, e.g. `{sample_by: paragraph}` for the text builder."""

    def load(self) -> datasets.Dataset:
        ds = datasets.load_dataset(self.path, self.name, data_files=self.data_files, split=self.split,
                                   **self.load_kwargs)
        if self.text_field not in ds.column_names:
            raise GenerationError(
                f"corpus {self.path!r} has no column {self.text_field!r} (it has {ds.column_names}); "
                "set corpus.text_field"
            )
        return ds.shuffle(seed=self.shuffle_seed) if self.shuffle_seed is not None else ds


def corpus_replay(
    corpus: CorpusSource,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    budget: Budget,
    max_length: int = 512,
    start_token: str | None = None,
    task_size: int | None = None,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Write `budget` worth of packed corpus sequences into `output_dir`; return the manifest.

    A corpus too small for the budget is an error (nothing is written); empty documents are
    skipped and counted in the manifest.
    """
    if max_length < 2:
        raise GenerationError(f"max_length must be >= 2, got {max_length}")
    start_id = resolve_start_token(tokenizer, start_token)
    separator = document_separator(tokenizer)
    max_sequences, max_tokens = budget.resolve(task_size)
    stats = {"documents": 0, "empty_documents": 0}
    manifest = {
        **provenance(tokenizer),
        "source": "corpus",
        "corpus": asdict(corpus),
        "start_token": tokenizer.convert_ids_to_tokens(start_id),
        "start_token_id": start_id,
        "document_separator": separator,
        "max_length": max_length,
        "budget": {"requested": vars(budget), "task_size": task_size,
                   "max_sequences": max_sequences, "max_tokens": max_tokens},
        "corpus_stats": stats,
    }
    chunks = _packed(corpus.load()[corpus.text_field], tokenizer, start_id,
                     tokenizer.convert_tokens_to_ids(separator), max_length, stats)
    return write_shards(output_dir, _budgeted(chunks, max_sequences, max_tokens, corpus), manifest,
                        shard_size, overwrite)


def _packed(texts, tokenizer: PreTrainedTokenizerBase, start_id: int, separator_id: int,
            max_length: int, stats: dict) -> Iterator[list[int]]:
    """Sequences of `max_length` tokens: the start token, then max_length - 1 packed text tokens."""
    buffer: list[int] = []
    for text in texts:
        stats["documents"] += 1
        if not text or not text.strip():
            stats["empty_documents"] += 1
            continue
        buffer += tokenizer.encode(text, add_special_tokens=False) + [separator_id]
        while len(buffer) >= max_length - 1:
            yield [start_id] + buffer[: max_length - 1]
            buffer = buffer[max_length - 1:]
    if buffer:
        yield [start_id] + buffer  # the shorter tail


def _budgeted(chunks: Iterator[list[int]], max_sequences: int | None, max_tokens: int | None,
              corpus: CorpusSource) -> Iterator[list[dict]]:
    done_seqs = done_tokens = 0
    for ids in chunks:
        if max_tokens is not None:
            ids = ids[: max_tokens - done_tokens + 1]  # the start token is not counted
        yield [{"input_ids": ids}]
        done_seqs, done_tokens = done_seqs + 1, done_tokens + len(ids) - 1
        if done_seqs == max_sequences or done_tokens == max_tokens:
            return
    raise GenerationError(
        f"corpus {corpus.path!r} ({corpus.split}) holds only {done_seqs} sequences / {done_tokens} "
        f"tokens, fewer than the budget asks ({max_sequences or max_tokens}); lower the budget or "
        "give a larger corpus"
    )


def corpus(
    tokenizer: str,
    corpus: CorpusSource,
    output: ShardOutput,
    budget: Budget,
    max_length: int = 512,
    start_token: str | None = None,
    task: TaskSource | None = None,
) -> dict:
    """`cfs corpus`: replay of real text, a corpus packed into replay shards (the pretraining-data
    baseline).

    Args:
        tokenizer: Tokenizer name or directory (the model's to be fine-tuned).
        corpus: The text: a `datasets` source or local files, and its text column.
        output: The replay directory to write.
        budget: How much: `sequences`, `tokens`, or `fraction` of the task dataset's size.
        max_length: Tokens per replay sequence, the start token included.
        start_token: Token each sequence starts with; None: the tokenizer's BOS.
        task: The task data, needed only by `budget.fraction`.
    """
    manifest = corpus_replay(corpus, load_tokenizer(tokenizer), output.dir, budget, max_length,
                             start_token, budget.task_size(task), output.shard_size, output.overwrite)
    print(f"{Path(output.dir)}: {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} "
          f"tokens of {corpus.path}")
    return manifest
