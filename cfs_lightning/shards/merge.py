"""One replay set from several: their sequences, in order, as one set of shards."""

from __future__ import annotations

from pathlib import Path

from datasets import concatenate_datasets
from transformers import PreTrainedTokenizerBase

from .manifest import provenance
from .reader import load_shards
from .writer import write_shards


def merge_shards(parts: list[str], out: str | Path, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Write the `input_ids` of every replay set in `parts` as one set into `out`; its manifest
    names the parts (`source: merged`). Returns the manifest."""
    rows = concatenate_datasets([load_shards(p).with_format(None).select_columns(["input_ids"]) for p in parts])
    return write_shards(out, [rows.to_list()], {**provenance(tokenizer), "source": "merged", "parts": parts})
