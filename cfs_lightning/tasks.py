"""The task dataset: any `datasets` source, templated into prompt and response, tokenized and masked.

A sequence is `[BOS] prompt response [EOS]` (BOS only where the tokenizer has one), or the
tokenizer's chat template applied to a user turn and an assistant turn. Labels are -100 on the
start token, the prompt and padding, so the task loss is the response's NLL alone.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from .chat import encode_chat
from .tokens import IGNORE_INDEX

log = logging.getLogger(__name__)


class TaskDataError(ValueError):
    """The task data cannot be read as configured; the message names the setting to change."""


@dataclass
class TaskSource:
    """Where the task data lives and how a record becomes a prompt and a response."""

    path: str = "json"
    """`datasets.load_dataset` path: a hub dataset name, or a builder (json, csv, parquet, text)
    used with `data_files`."""
    data_files: str | list[str] | dict[str, str] | None = None
    """Local files for a builder; a dict maps split names to files."""
    name: str | None = None
    """Dataset configuration name, for hub datasets that have several."""
    split: str = "train"
    """Training split; slicing works: `train[:4800]`."""
    val_split: str | None = None
    """Validation split, e.g. `test[:200]`; None: no task validation."""
    test_split: str | None = None
    """Split used by `cfs test`; None: no task test loader."""
    prompt: str | None = "{prompt}"
    """Template of the prompt over record fields, e.g. `Question: {question}\\nAnswer:`.
    None: no prompt, every token of the response is trained on (plain language modelling)."""
    response: str = "{response}"
    """Template of the response over record fields, e.g. ` {answer}`."""
    chat_template: bool = False
    """Render prompt and response as a user and an assistant turn with the tokenizer's chat
    template (which then supplies its own BOS and end-of-turn tokens). The prompt is masked up to
    the end of the template's generation prompt; the rest of the assistant turn is trained on
    (Qwen3: its empty `<think>` block too, as the template writes it; `cfs_lightning.chat`)."""
    max_length: int = 512
    """Tokens per sequence (start token, prompt and response), at most; see `long_sequences`."""
    long_sequences: Literal["truncate", "drop", "error"] = "truncate"
    """What a sequence longer than `max_length` becomes: `truncate` cuts it (counted and warned
    about; one left with no response token is dropped), `drop` leaves it out (counted), `error`
    refuses the data, naming the record."""
    shards: str | None = None
    """Training sequences already tokenized with their labels, written by `cfs self-output`,
    `cfs rephrase` or `cfs token-mask` from this task: they replace `split` in training
    (validation and test still read `val_split` / `test_split`)."""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `load_dataset` arguments, e.g. `{sample_by: paragraph}` for the text builder."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise TaskDataError(f"task.max_length must be >= 2, got {self.max_length}")
        if self.long_sequences not in ("truncate", "drop", "error"):
            raise TaskDataError(f"task.long_sequences must be truncate, drop or error, got {self.long_sequences!r}")
        if self.chat_template and self.prompt is None:
            raise TaskDataError("task.chat_template needs a prompt template (task.prompt)")

    def describe(self) -> dict[str, Any]:
        """What a manifest records of the task a set of shards was made from."""
        return {"path": self.path, "data_files": self.data_files, "split": self.split, "prompt": self.prompt,
                "response": self.response, "chat_template": self.chat_template, "max_length": self.max_length,
                "long_sequences": self.long_sequences}

    def load(self, split: str) -> datasets.Dataset:
        """The raw records of one split."""
        try:
            ds = datasets.load_dataset(
                self.path, self.name, data_files=self.data_files, split=split, **self.load_kwargs
            )
        except StopIteration:  # what the json builder raises on an empty file
            ds = []
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowInvalid, ValueError) as err:
            if "corresponds to no data" not in str(err):  # datasets' words for a file of blank lines
                raise TaskDataError(
                    f"cannot read the {split!r} split of {self.path!r} (data_files={self.data_files!r}): "
                    f"{err}"
                ) from err
            ds = []
        if len(ds) == 0:
            raise TaskDataError(
                f"the {split!r} split of {self.path!r} (data_files={self.data_files!r}) has no records; "
                "point task.data_files / task.split at the data"
            )
        fields = set(ds.column_names)
        for kind, template in (("prompt", self.prompt), ("response", self.response)):
            needed = _template_fields(template)
            if not needed <= fields:
                raise TaskDataError(
                    f"task.{kind} template {template!r} uses fields {sorted(needed - fields)} "
                    f"that the {split!r} split of {self.path!r} does not have; its fields are "
                    f"{sorted(fields)}"
                )
        return ds

    def prompt_ids(self, record: dict, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The token ids of one record's prompt, as training sees it (start token / chat header)."""
        return _Encoder(self, tokenizer)._encode(record)[0]

    def example(self, record: dict, tokenizer: PreTrainedTokenizerBase,
                response_ids: list[int] | None = None) -> dict:
        """One record as a training row (`input_ids`, `labels`, `truncated`, `num_targets`), its
        response replaced by `response_ids` when given (self-generated targets)."""
        encoder = _Encoder(self, tokenizer)
        prompt_ids, reference_ids = encoder._encode(record)
        return encoder.example(prompt_ids, reference_ids if response_ids is None else response_ids)

    def tokenize(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
        """Tokenize and mask; warn about truncation; drop rows left without a response token."""
        encoded = ds.map(
            _Encoder(self, tokenizer),
            batched=True,
            with_indices=True,
            remove_columns=ds.column_names,
            desc="tokenizing task data",
        )
        # Rows picked from two columns read as arrays: a `filter` pass would run Python per row
        # (and draw a progress bar of its own on every fit).
        flags, n = encoded.with_format("numpy", columns=["truncated", "num_targets"])[:], len(encoded)
        keep = flags["num_targets"] > 0
        if self.long_sequences == "drop":
            keep &= ~flags["truncated"]
        kept, n_cut = encoded.select(np.flatnonzero(keep)), int(flags["truncated"].sum())
        if n_cut:
            fate = ("were dropped" if self.long_sequences == "drop" else
                    f"were cut; {n - len(kept)} had no response token left and were dropped")
            log.warning("task data: %d of %d sequences (%.1f%%) were longer than task.max_length=%d and %s. "
                        "Raise task.max_length to keep them whole.", n_cut, n, 100 * n_cut / n, self.max_length, fate)
        if len(kept) == 0:
            raise TaskDataError(f"no task example of {self.path!r} has a response token left")
        return kept.remove_columns(["truncated", "num_targets"])


def _template_fields(template: str | None) -> set[str]:
    if template is None:
        return set()
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


class _Encoder:
    """Batched map function: records -> input_ids, labels, truncated, num_targets."""

    def __init__(self, source: TaskSource, tokenizer: PreTrainedTokenizerBase) -> None:
        self.source, self.tok = source, tokenizer
        self.fields = {kind: _template_fields(template)  # checked in every record
                       for kind, template in (("prompt", source.prompt), ("response", source.response))}

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "num_targets": []}
        for index, record in zip(indices, records, strict=True):
            row = self.example(*self._encode(record, index))
            if row["truncated"] and self.source.long_sequences == "error":
                raise TaskDataError(
                    f"task record {index} is {row['length']} tokens long, more than task.max_length="
                    f"{self.source.max_length}; raise task.max_length, or set task.long_sequences to "
                    "truncate (cut such sequences) or drop (leave them out)"
                )
            for key in out:
                out[key].append(row[key])
        return out

    def example(self, prompt_ids: list[int], response_ids: list[int]) -> dict:
        """One training row: prompt masked, cut to max_length, with its count of targets."""
        ids = prompt_ids + response_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        n = self.source.max_length
        # targets are labels[1:]: position 0 is never predicted
        return {"input_ids": ids[:n], "labels": labels[:n], "truncated": len(ids) > n, "length": len(ids),
                "num_targets": sum(x != IGNORE_INDEX for x in labels[1:n])}

    def _encode(self, record: dict, index: int | None = None) -> tuple[list[int], list[int]]:
        src, tok = self.source, self.tok
        for kind, names in self.fields.items():
            for name in names:
                if not isinstance(record.get(name), (str, int, float)) or isinstance(record[name], bool):
                    where = f"task record {index}" if index is not None else "a task record"
                    raise TaskDataError(
                        f"{where} has {'no' if record.get(name) is None else 'a non-text'} {name!r} "
                        f"field (got {record.get(name)!r}), which the task.{kind} template "
                        f"{getattr(src, kind)!r} needs; fix or remove the record"
                    )
        response = src.response.format(**record)
        if src.chat_template:
            return self._encode_chat(src.prompt.format(**record), response)
        start = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prompt_ids = tok.encode(src.prompt.format(**record), add_special_tokens=False) if src.prompt else []
        response_ids = tok.encode(response, add_special_tokens=False) + [tok.eos_token_id]
        return start + prompt_ids, response_ids

    def _encode_chat(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        # The prompt is what the template renders before the assistant turn (its generation
        # prompt); the response is the turn as the whole conversation renders it, end-of-turn included.
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids, labels = encode_chat(
            self.tok, messages, ("assistant",),
            fix="set task.chat_template=false and write the template's markers into task.prompt and "
                "task.response (cfs_lightning adds BOS and EOS)")
        n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        return ids[:n_prompt], ids[n_prompt:]
