"""Generate a replay directory from a base model: sample, shard, record provenance."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loading import BaseModelArgs
from ..sampling import Budget, GenerationError, SamplingConfig, sample_context_free
from ..shards import ShardOutput, Stream, provenance, write_shards
from ..tasks import TaskSource
from ..tokens import eval_mode, resolve_start_token, stop_token_ids
from .vllm_backend import sample_with_vllm


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
    distributed: bool = False,
    backend: Literal["hf", "vllm"] = "hf",
) -> dict:
    """Sample context-free replay from `model` into `output_dir`; return the manifest.

    With `store_topk=k` the shards also cache the model's top-k next-token log-probabilities at
    every position (for `KLFromCachedTopK`). The model is put in eval mode for sampling and given
    back in the mode it came in.

    With `distributed`, every rank of the initialised process group calls it with its own copy of
    the model: the budget's batches are dealt out over the ranks (see `sample_context_free`), each
    rank writes its own shards, and the manifest lists them all. The same seed and budget give the
    same set of sequences whatever the number of processes (the order of rows in the merged set
    follows the ranks).

    `backend="vllm"` samples with vLLM from the checkpoint `model.name_or_path` (GPU, one
    process); `model` then only supplies the manifest's provenance (fingerprint, dtype).
    """
    if backend not in ("hf", "vllm"):
        raise GenerationError(f"backend must be 'hf' or 'vllm', got {backend!r}")
    if backend == "vllm" and distributed:
        raise GenerationError("backend='vllm' runs as one process (vLLM shards the model itself): "
                              "launch it without torchrun")
    start_id = resolve_start_token(tokenizer, sampling.start_token)  # fail before any work
    max_sequences, max_tokens = budget.resolve(task_size)
    manifest = {
        **provenance(tokenizer, model),
        "source": "context_free",
        "start_token": tokenizer.convert_ids_to_tokens(start_id),
        "start_token_id": start_id,
        "sampling": sampling.to_dict(),
        "store_topk": store_topk,
        "backend": backend,
        "budget": {"requested": vars(budget), "task_size": task_size,
                   "max_sequences": max_sequences, "max_tokens": max_tokens},
    }
    stream = _stream(model, tokenizer, sampling, max_sequences, max_tokens, store_topk, distributed, backend)
    with eval_mode(model):
        return write_shards(output_dir, stream, manifest, shard_size, overwrite, distributed)


def _stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sampling: SamplingConfig,
            max_sequences: int | None, max_tokens: int | None, store_topk: int, distributed: bool,
            backend: Literal["hf", "vllm"]) -> Stream:
    """The batches `write_shards` writes, with a progress bar on rank 0: resumable with `hf`."""
    shown = not distributed or dist.get_rank() == 0
    total, unit = (max_sequences, "seq") if max_sequences else (max_tokens, "tok")
    if backend == "vllm":  # not resumable mid-stream: a rerun samples again, the writer skips what is on disk
        return _with_progress(sample_with_vllm(model.name_or_path, tokenizer, sampling, max_sequences,
                                               max_tokens, stop_token_ids(tokenizer, model), store_topk,
                                               dtype=str(model.dtype).removeprefix("torch.")),
                              total, unit, shown)

    def stream(written: list[int]) -> Iterator[list[dict]]:
        """The rest of the budget after the `written` records."""
        batches = sample_context_free(model, tokenizer, sampling, max_sequences, max_tokens,
                                      store_topk, distributed, written)
        return _with_progress(batches, total, unit, shown, len(written) if unit == "seq" else sum(written))

    return stream


def _with_progress(batches, total: int, unit: str, shown: bool = True, done: int = 0):
    """Pass batches through while showing sequences or tokens done and tokens/s (this process's
    share, in a distributed run); `done`: already on disk when resuming."""
    bar = tqdm(total=total, initial=done, unit=unit, desc="context-free sampling", dynamic_ncols=True,
               disable=not shown)
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


@contextlib.contextmanager
def torchrun_process_group() -> Iterator[bool]:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE > 1):
    NCCL with CUDA, else gloo. Yields whether the run is distributed; leaves the group on exit."""
    if dist.is_available() and dist.is_initialized():
        yield dist.get_world_size() > 1
        return
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield False
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield True
    finally:
        dist.destroy_process_group()


def generate(
    base: BaseModelArgs,
    output: ShardOutput,
    budget: Budget,
    sampling: SamplingConfig = SamplingConfig(),
    task: TaskSource | None = None,
    store_topk: int = 0,
    backend: Literal["hf", "vllm"] = "hf",
) -> dict:
    """`cfs generate`: sample context-free replay sequences from a base model into Arrow shards +
    manifest.json.

    On N processes: `torchrun --nproc-per-node N -m cfs_lightning.cli generate --config ...`
    (one GPU per process with CUDA, else CPU with gloo); the budget's batches are dealt out over
    the ranks and the manifest lists every rank's shards.

    Args:
        base: The base model to sample from.
        output: The replay directory to write.
        budget: How much: `sequences`, `tokens`, or `fraction` of the task dataset's size.
        sampling: Sampling settings (temperature 1, no truncation by default).
        task: The task data, needed only by `budget.fraction` (its training split is counted).
        store_topk: Also cache the model's top-k next-token log-probabilities at every position
            (k per token; needed by `KLFromCachedTopK`); 0: none.
        backend: `hf` (transformers `generate`) or `vllm` (GPU, the optional `vllm` extra; the
            model is then also loaded on CPU for the manifest's fingerprint).
    """
    task_size = budget.task_size(task)
    lm, tok = base.load(device="cpu")
    with torchrun_process_group() as distributed:
        device = base.device
        if device == "auto":
            cuda = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if distributed else "cuda"
            device = cuda if torch.cuda.is_available() and backend == "hf" else "cpu"
        manifest = generate_replay(lm.to(device), tok, output.dir, sampling, budget, task_size=task_size,
                                   shard_size=output.shard_size, overwrite=output.overwrite,
                                   store_topk=store_topk, distributed=distributed, backend=backend)
        if not distributed or dist.get_rank() == 0:
            print(f"{Path(output.dir)}: {manifest['num_sequences']} sequences, "
                  f"{manifest['num_generated_tokens']} generated tokens")
    return manifest
