"""Generate a replay directory from a base model: sample, shard, record provenance."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import cfs_lightning

from .sampler import Budget, SamplingConfig, resolve_start_token, sample_context_free
from .shards import model_fingerprint, tokenizer_fingerprint, write_shards


def generate_replay(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    sampling: SamplingConfig,
    budget: Budget,
    task_size: int | None = None,
    shard_size: int = 10_000,
    overwrite: bool = False,
    store_topk: int = 0,
) -> dict:
    """Sample context-free replay from `model` into `output_dir`; return the manifest.

    With `store_topk=k` the shards also cache the model's top-k next-token log-probabilities at
    every position (for `KLFromCachedTopK`). The model is put in eval mode for sampling and given
    back in the mode it came in.
    """
    start_id = resolve_start_token(tokenizer, sampling.start_token)  # fail before any work
    max_sequences, max_tokens = budget.resolve(task_size)
    manifest = {
        "format": "cfs_lightning.replay/1",
        "package_version": cfs_lightning.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.name_or_path,
        "model_type": model.config.model_type,
        "model_num_parameters": model.num_parameters(),
        "model_dtype": str(model.dtype),
        "model_fingerprint": model_fingerprint(model),
        "tokenizer": tokenizer.name_or_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "start_token_id": start_id,
        "eos_token_id": tokenizer.eos_token_id,
        "sampling": sampling.to_dict(),
        "store_topk": store_topk,
        "budget": {"requested": vars(budget), "task_size": task_size,
                   "max_sequences": max_sequences, "max_tokens": max_tokens},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    was_training = model.training
    model.eval()
    try:
        batches = _with_progress(
            sample_context_free(model, tokenizer, sampling, max_sequences, max_tokens, store_topk),
            total=max_sequences or max_tokens,
            unit="seq" if max_sequences else "tok",
        )
        return write_shards(output_dir, batches, manifest, shard_size, overwrite)
    finally:
        model.train(was_training)


def _with_progress(batches, total: int, unit: str):
    """Pass batches through while showing sequences or tokens done and tokens/s."""
    bar = tqdm(total=total, unit=unit, desc="context-free sampling", dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0
    try:
        for records in batches:
            n_tok = sum(len(r["input_ids"]) - 1 for r in records)
            tokens += n_tok
            bar.update(len(records) if unit == "seq" else n_tok)
            bar.set_postfix(tok_per_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            yield records
    finally:
        bar.close()
