"""The data-side commands of `cfs`, one function each: their arguments are the YAML's keys.

Replay writers: `generate` (context-free), `contextual`, `corpus`, `dialogue`. Task rewriters
(their shards replace the task's training split through `data.task.shards`): `self-output`,
`rephrase`, `token-mask`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer

from .data import TaskSource
from .generation import Budget, SamplingConfig, generate_replay
from .generation.contextual import contextual_replay
from .generation.corpus import CorpusSource, corpus_replay
from .generation.dialogue import USER_TEMPLATE, read_seeds, self_dialogue
from .generation.generate import torchrun_process_group
from .generation.self_output import REPHRASE_TEMPLATE, self_generated_targets
from .generation.token_mask import Mode, token_mask
from .generation.verifiers import GSM8KAnswer, Verifier
from .loading import load_causal_lm


def _load_base(model: str, tokenizer: str | None, dtype: str | None, trust_remote_code: bool,
               device: str = "cpu"):
    """The base model (float32 unless `dtype`, on `device`; `auto`: CUDA when available) and its
    tokenizer (`tokenizer`, default `model`)."""
    tok = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
    lm = load_causal_lm(model, dtype, trust_remote_code)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return lm.to(device), tok


def _task_size(task: TaskSource | None, budget: Budget) -> int | None:
    """Training examples of `task`, counted only when the budget is a fraction of them."""
    return len(task.load(task.split)) if task is not None and budget.fraction else None


def generate(
    model: str,
    output_dir: str,
    budget: Budget,
    sampling: SamplingConfig = SamplingConfig(),
    task: TaskSource | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    shard_size: int = 10_000,
    overwrite: bool = False,
    store_topk: int = 0,
    backend: Literal["hf", "vllm"] = "hf",
    trust_remote_code: bool = False,
) -> dict:
    """Sample context-free replay sequences from a base model into Arrow shards + manifest.json.

    On N processes: `torchrun --nproc-per-node N -m cfs_lightning.cli generate --config ...`
    (one GPU per process with CUDA, else CPU with gloo); the budget's batches are dealt out over
    the ranks and the manifest lists every rank's shards.

    Args:
        model: Base model: hub name or local directory.
        output_dir: Replay directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        budget: How much: `sequences`, `tokens`, or `fraction` of the task dataset's size.
        sampling: Sampling settings (temperature 1, no truncation by default).
        task: The task data, needed only by `budget.fraction` (its training split is counted).
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype (`float32`, `bfloat16`, ...); default float32.
        device: `auto` (CUDA when available, the process's own GPU under torchrun), `cpu`,
            `cuda`, `cuda:1`, ...
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
        store_topk: Also cache the model's top-k next-token log-probabilities at every position
            (k per token; needed by `KLFromCachedTopK`); 0: none.
        backend: `hf` (transformers `generate`) or `vllm` (GPU, the optional `vllm` extra; the
            model is then also loaded on CPU for the manifest's fingerprint).
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    task_size = _task_size(task, budget)
    lm, tok = _load_base(model, tokenizer, dtype, trust_remote_code)
    with torchrun_process_group() as distributed:
        if device == "auto":
            cuda = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if distributed else "cuda"
            device = cuda if torch.cuda.is_available() and backend == "hf" else "cpu"
        manifest = generate_replay(lm.to(device), tok, output_dir, sampling, budget,
                                   task_size=task_size, shard_size=shard_size, overwrite=overwrite,
                                   store_topk=store_topk, distributed=distributed, backend=backend)
        if not distributed or torch.distributed.get_rank() == 0:
            print(f"{Path(output_dir)}: {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} "
                  f"generated tokens")
    return manifest


def corpus(
    tokenizer: str,
    corpus: CorpusSource,
    output_dir: str,
    budget: Budget,
    max_length: int = 512,
    start_token: str | None = None,
    task: TaskSource | None = None,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Replay of real text: pack a corpus into replay shards (the pretraining-data baseline).

    Args:
        tokenizer: Tokenizer name or directory (the model's to be fine-tuned).
        corpus: The text: a `datasets` source or local files, and its text column.
        output_dir: Replay directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        budget: How much: `sequences`, `tokens`, or `fraction` of the task dataset's size.
        max_length: Tokens per replay sequence, the start token included.
        start_token: Token each sequence starts with; None: the tokenizer's BOS.
        task: The task data, needed only by `budget.fraction`.
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
    """
    manifest = corpus_replay(corpus, AutoTokenizer.from_pretrained(tokenizer), output_dir, budget,
                             max_length, start_token, _task_size(task, budget), shard_size, overwrite)
    print(f"{Path(output_dir)}: {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} tokens "
          f"of {corpus.path}")
    return manifest


def contextual(
    model: str,
    task: TaskSource,
    output_dir: str,
    budget: Budget,
    sampling: SamplingConfig = SamplingConfig(),
    tokenizer: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    shard_size: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Contextual synthetic replay: the base model's continuations of the task prompts.

    Args:
        model: Base model: hub name or local directory.
        task: The task whose training prompts are continued (templated as for training).
        output_dir: Replay directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        budget: How much: `sequences`, generated `tokens`, or `fraction` of the task's size.
        sampling: Sampling settings (temperature 1, no truncation by default).
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype; default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    lm, tok = _load_base(model, tokenizer, dtype, trust_remote_code, device)
    manifest = contextual_replay(lm, tok, task, output_dir, sampling, budget, shard_size, overwrite)
    print(f"{Path(output_dir)}: {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} tokens; "
          f"skipped: {manifest['contextual_stats']}")
    return manifest


SELF_OUTPUT_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=256, batch_size=32)
"""Self-Output / Rephrase defaults (arXiv 2501.14315): temperature 0.7, top-p 0.95."""


def self_output(
    model: str,
    task: TaskSource,
    output_dir: str,
    verifier: Verifier = GSM8KAnswer(),
    num_samples: int = 4,
    sampling: SamplingConfig = SELF_OUTPUT_SAMPLING,
    tokenizer: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    score_batch_size: int = 16,
    shard_size: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Self-Output: the base model answers each task prompt; the lowest-perplexity correct answer
    replaces the reference (which is kept where none is correct). Train with `data.task.shards`.

    Args:
        model: Base model: hub name or local directory.
        task: The task whose training split is rewritten.
        output_dir: Shard directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        verifier: Decides which samples are correct (default: GSM8K `#### <number>` match).
        num_samples: Responses drawn per prompt.
        sampling: Sampling settings; `batch_size` counts prompts x num_samples per call.
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype; default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        score_batch_size: Sequences per forward pass when scoring perplexity.
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    return _rewrite("self_output", model, task, output_dir, verifier, num_samples, sampling, tokenizer,
                    dtype, device, REPHRASE_TEMPLATE, score_batch_size, shard_size, overwrite, trust_remote_code)


def rephrase(
    model: str,
    task: TaskSource,
    output_dir: str,
    verifier: Verifier = GSM8KAnswer(),
    template: str = REPHRASE_TEMPLATE,
    num_samples: int = 1,
    sampling: SamplingConfig = SELF_OUTPUT_SAMPLING,
    tokenizer: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    score_batch_size: int = 16,
    shard_size: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Rephrase: the base model rewrites each reference response in its own words; rewrites the
    verifier accepts replace the reference. Train with `data.task.shards`.

    Args:
        model: Base model: hub name or local directory.
        task: The task whose training split is rewritten.
        output_dir: Shard directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        verifier: Filters wrong rewrites (default: GSM8K `#### <number>` match).
        template: Rewrite prompt over `{prompt}` and `{response}`, the task's rendered prompt and
            response (through the chat template when `task.chat_template`).
        num_samples: Rewrites drawn per record; the lowest-perplexity correct one is kept.
        sampling: Sampling settings; `batch_size` counts records x num_samples per call.
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype; default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        score_batch_size: Sequences per forward pass when scoring perplexity.
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    return _rewrite("rephrase", model, task, output_dir, verifier, num_samples, sampling, tokenizer,
                    dtype, device, template, score_batch_size, shard_size, overwrite, trust_remote_code)


def _rewrite(method, model, task, output_dir, verifier, num_samples, sampling, tokenizer, dtype, device,
             template, score_batch_size, shard_size, overwrite, trust_remote_code) -> dict:
    lm, tok = _load_base(model, tokenizer, dtype, trust_remote_code, device)
    manifest = self_generated_targets(lm, tok, task, verifier, output_dir, sampling, num_samples, method,
                                      template, score_batch_size, shard_size, overwrite)
    stats = manifest["stats"]
    print(f"{Path(output_dir)}: {manifest['num_sequences']} task sequences: "
          f"{stats['verified']} {method.replace('_', '-')} responses verified, {stats['fallback']} "
          f"kept their reference; {stats}")
    return manifest


def token_mask_command(
    model: str,
    task: TaskSource,
    output_dir: str,
    tau: float = 2.5,
    mode: Mode = "high",
    seed: int = 0,
    batch_size: int = 16,
    tokenizer: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    shard_size: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Selective token masking (STM): the base model scores every response token of the task;
    those with perplexity above `tau` leave the loss. Train with `data.task.shards`.

    Args:
        model: Base model: hub name or local directory.
        task: The task to score (its training split).
        output_dir: Shard directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        tau: Perplexity threshold (exp of the token's NLL, given all tokens before it).
        mode: `high` masks the tokens above tau; `random` (control) as many random response
            tokens per sequence; `low` (control) as many lowest-perplexity ones.
        seed: Seed of `random` mode.
        batch_size: Sequences per forward pass.
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype; default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    lm, tok = _load_base(model, tokenizer, dtype, trust_remote_code, device)
    manifest = token_mask(lm, tok, task, output_dir, tau, mode, seed, batch_size, shard_size, overwrite)
    stats = manifest["stats"]
    print(f"{Path(output_dir)}: {manifest['num_sequences']} task sequences: masked "
          f"{stats['masked_tokens']} of {stats['response_tokens']} response tokens "
          f"({100 * stats['masked_fraction']:.1f}%, mode {mode}, tau {tau}); dropped {stats['dropped']}")
    return manifest


DIALOGUE_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=256, batch_size=32)
"""Self-dialogue defaults (SA-SFT, arXiv 2602.20162): temperature 0.7, top-p 0.9."""


def dialogue(
    model: str,
    output_dir: str,
    num_dialogues: int,
    seeds: list[str] | None = None,
    seeds_file: str | None = None,
    seed_template: str = "{seed}",
    turns: int = 2,
    max_length: int = 512,
    train_on_user_turns: bool = False,
    chat_template: str | None = None,
    user_template: str = USER_TEMPLATE,
    sampling: SamplingConfig = DIALOGUE_SAMPLING,
    tokenizer: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    shard_size: int = 10_000,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Self-dialogue replay (SA-SFT): the base model writes multi-turn dialogues with itself
    through its chat template; mix them with the task as `data.replay.dir`.

    Args:
        model: Base model: hub name or local directory.
        output_dir: Replay directory to write. An interrupted run resumes from
            `<output_dir>.partial`; a finished one with the same settings is left as it is.
        num_dialogues: Dialogues to write (seeds are cycled in a seeded shuffle).
        seeds: Seed instructions or topics that open the dialogues.
        seeds_file: A text file of further seeds, one per line.
        seed_template: Turns a seed into the first user message, e.g. `Tell me about {seed}.`
        turns: Assistant turns per dialogue (user turns in between are model-written too).
        max_length: Tokens per dialogue at most; a dialogue ends at its last complete assistant
            turn that fits.
        train_on_user_turns: Also train on the user turns (default: assistant turns only).
        chat_template: Jinja chat template (string or `.jinja` file) for tokenizers without one.
        user_template: Prompt over `{transcript}` through which the model writes a user turn.
        sampling: Sampling settings (default temperature 0.7, top-p 0.9).
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype; default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        shard_size: Sequences per Arrow shard.
        overwrite: Replace a directory written with other settings (only once the new one
            is complete), discarding an interrupted run with other settings.
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    lm, tok = _load_base(model, tokenizer, dtype, trust_remote_code, device)
    manifest = self_dialogue(lm, tok, read_seeds(seeds, seeds_file), output_dir, sampling, num_dialogues,
                             turns, max_length, seed_template, user_template, chat_template,
                             train_on_user_turns, shard_size, overwrite)
    print(f"{Path(output_dir)}: {manifest['num_sequences']} dialogues; {manifest['stats']}")
    return manifest


COMMANDS = {"generate": generate, "corpus": corpus, "contextual": contextual, "self-output": self_output,
            "rephrase": rephrase, "token-mask": token_mask_command, "dialogue": dialogue}
"""`cfs <name>` -> the function it runs (the rest of `cfs` is LightningCLI or imports lazily)."""
