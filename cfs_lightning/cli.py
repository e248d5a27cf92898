"""The `cfs` command: `fit|validate|test` (LightningCLI), `generate`, `contextual`, `corpus`,
`interpolate`, `init`, `demo`.

Every command takes `--config X.yaml`, dotted overrides (`--a.b=c`), `--help` and
`--print_config`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI, set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from transformers import AutoModelForCausalLM, AutoTokenizer

from .callbacks import HFExport
from .data import ReplayDataModule, TaskSource
from .generation import Budget, SamplingConfig, generate_replay
from .generation.contextual import contextual_replay
from .generation.corpus import CorpusSource, corpus_replay
from .generation.generate import torchrun_process_group
from .module import CausalLMFineTuner

# Config dataclasses document their fields with attribute docstrings; show them in --help.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

USAGE = """usage: cfs COMMAND --config FILE.yaml [--key=value ...]

commands:
  fit | validate | test   train or evaluate a model (LightningCLI; `cfs fit --help`)
  generate                write context-free replay shards from a base model
  contextual              write contextual replay: the base model continuing the task prompts
  corpus                  write replay shards of real text (a corpus)
  interpolate             WiSE-FT: evaluate weight interpolations of a base and a fine-tuned model
  init                    train a BPE tokenizer and write a randomly initialised model
  demo                    the toy-world comparison: base, plain fine-tuning, CFS replay
"""


class CFSCLI(LightningCLI):
    """LightningCLI with the model's tokenizer linked to the data and an HF export at fit end.

    With `--ckpt_path`, the run is configured by the command line alone, as given: LightningCLI
    would otherwise overlay the checkpoint's saved hyperparameters on the model's config, which
    drops the regularizers and the optimizer (they are not hyperparameters). The checkpoint's
    hyperparameters are instead checked against the config, and a difference is an error.
    """

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        path = Path(ckpt_path)
        meta = path / "meta.pt" if path.is_dir() else path  # a distributed checkpoint is a folder
        if not meta.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file or folder")
        # The user's own checkpoint; hyperparameters may hold config dataclasses (LoRA).
        saved = torch.load(meta, weights_only=False, map_location="cpu").get("hyper_parameters", {})
        given = self.config[subcommand].model.init_args
        for key, value in saved.items():
            if key in given and _plain(given[key]) != _plain(value):
                raise ValueError(
                    f"--ckpt_path {ckpt_path} was saved with model.{key}={value!r}, but the config "
                    f"gives {_plain(given[key])!r}; resume with the config the checkpoint was trained with"
                )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(HFExport, "export")
        parser.link_arguments(
            ("model.init_args.pretrained", "model.init_args.tokenizer"),
            "data.init_args.tokenizer",
            compute_fn=lambda pretrained, tokenizer: tokenizer or pretrained,
        )


def _plain(value):
    """A config value as plain Python (jsonargparse Namespaces and dataclasses become dicts)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value.as_dict() if hasattr(value, "as_dict") else value


def run_cli(args: list[str] | None = None, run: bool = True) -> CFSCLI:
    """Run `cfs fit|validate|test ...` in this process and return the CLI (trainer, model, data).

    `args` None reads the command line.
    """
    return CFSCLI(
        CausalLMFineTuner,
        ReplayDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def _load_base(model: str, tokenizer: str | None, dtype: str | None, trust_remote_code: bool):
    """The base model (float32 unless `dtype`) and its tokenizer (`tokenizer`, default `model`)."""
    tok = AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(
        model, dtype=getattr(torch, dtype) if dtype else torch.float32, trust_remote_code=trust_remote_code)
    return lm, tok


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
        output_dir: Replay directory to write; refused if it exists unless `overwrite`.
        budget: How much: `sequences`, `tokens`, or `fraction` of the task dataset's size.
        sampling: Sampling settings (temperature 1, no truncation by default).
        task: The task data, needed only by `budget.fraction` (its training split is counted).
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype (`float32`, `bfloat16`, ...); default float32.
        device: `auto` (CUDA when available, the process's own GPU under torchrun), `cpu`,
            `cuda`, `cuda:1`, ...
        shard_size: Sequences per Arrow shard.
        overwrite: Replace an existing replay directory (only once the new one is complete).
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
            print(f"wrote {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} "
                  f"generated tokens to {Path(output_dir)}")
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
        output_dir: Replay directory to write; refused if it exists unless `overwrite`.
        budget: How much: `sequences`, `tokens`, or `fraction` of the task dataset's size.
        max_length: Tokens per replay sequence, the start token included.
        start_token: Token each sequence starts with; None: the tokenizer's BOS.
        task: The task data, needed only by `budget.fraction`.
        shard_size: Sequences per Arrow shard.
        overwrite: Replace an existing replay directory (only once the new one is complete).
    """
    manifest = corpus_replay(corpus, AutoTokenizer.from_pretrained(tokenizer), output_dir, budget,
                             max_length, start_token, _task_size(task, budget), shard_size, overwrite)
    print(f"wrote {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} tokens "
          f"of {corpus.path} to {Path(output_dir)}")
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
        output_dir: Replay directory to write; refused if it exists unless `overwrite`.
        budget: How much: `sequences`, generated `tokens`, or `fraction` of the task's size.
        sampling: Sampling settings (temperature 1, no truncation by default).
        tokenizer: Tokenizer name or directory; default: `model`.
        dtype: Weight dtype; default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        shard_size: Sequences per Arrow shard.
        overwrite: Replace an existing replay directory (only once the new one is complete).
        trust_remote_code: Allow model code shipped with the checkpoint to run.
    """
    lm, tok = _load_base(model, tokenizer, dtype, trust_remote_code)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = contextual_replay(lm.to(device), tok, task, output_dir, sampling, budget, shard_size, overwrite)
    print(f"wrote {manifest['num_sequences']} sequences, {manifest['num_generated_tokens']} tokens "
          f"to {Path(output_dir)}; skipped: {manifest['contextual_stats']}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        CLI(COMMANDS[command], args=rest, as_positional=False)
    elif command == "interpolate":
        from .wise_ft import interpolate

        CLI(interpolate, args=rest, as_positional=False)
    elif command == "init":
        from .toy.init_model import init_model

        CLI(init_model, args=rest, as_positional=False)
    elif command == "demo":
        from .toy.demo import run_demo

        CLI(run_demo, args=rest, as_positional=False)
    elif command in ("fit", "validate", "test"):
        run_cli(None if from_command_line else argv)
    else:
        sys.exit(f"cfs: unknown command {command!r}\n\n{USAGE}")


COMMANDS = {"generate": generate, "corpus": corpus, "contextual": contextual}
"""Commands that are one function each (the rest are LightningCLI or import lazily)."""


if __name__ == "__main__":
    main()
