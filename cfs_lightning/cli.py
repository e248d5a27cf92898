"""The `cfs` command: `fit|validate|test` (LightningCLI), the data-side commands of
`commands.py` (`generate`, `contextual`, `corpus`, `dialogue`, `self-output`, `rephrase`,
`token-mask`), `continual`, `interpolate`, `report`, `study`, `init`, `demo`.

Every command takes `--config X.yaml`, dotted overrides (`--a.b=c`), `--help` and
`--print_config`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from jsonargparse import CLI, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from .callbacks import HFExport
from .commands import COMMANDS
from .data import ReplayDataModule
from .module import CausalLMFineTuner

# Config dataclasses document their fields with attribute docstrings; show them in --help.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

USAGE = """usage: cfs COMMAND --config FILE.yaml [--key=value ...]

commands:
  fit | validate | test   train or evaluate a model (LightningCLI; `cfs fit --help`)
  generate                write context-free replay shards from a base model
  contextual              write contextual replay: the base model continuing the task prompts
  corpus                  write replay shards of real text (a corpus)
  dialogue                write self-dialogue replay: the base model talking with itself
  self-output             rewrite the task's targets with the base model's verified answers
  rephrase                rewrite the task's targets with the base model's verified rephrasings
  token-mask              drop the task's high-perplexity tokens from the loss (STM)
  continual               fine-tune on a sequence of tasks; report average score and BWT
  interpolate             WiSE-FT: evaluate weight interpolations of a base and a fine-tuned model
  init                    train a BPE tokenizer and write a randomly initialised model
  report                  tables and plots comparing runs, from their logs
  study                   fit a list of methods x seeds on one base model and task, then report
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
        # Tensors and plain data only (and the LoRA settings, registered as safe): a checkpoint
        # cannot run code when it is read.
        saved = torch.load(meta, weights_only=True, map_location="cpu").get("hyper_parameters", {})
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


def run_command(fn, config: str, overrides: dict) -> object:
    """Run a jsonargparse command function (`cfs generate`, `cfs init`, ...) with its YAML config
    and some fields replaced (`{"output_dir": ...}`; dotted keys reach nested fields)."""
    args = ["--config", config] + [f"--{k}={v}" for k, v in overrides.items()]
    return CLI(fn, args=args, as_positional=False)


def run_fit(configs: list[str], overrides: list[str]):
    """`cfs fit --config C1 --config C2 ... overrides` in this process; returns its `RetainedEval`."""
    from .callbacks import RetainedEval

    args = ["fit"]
    for c in configs:
        args += ["--config", c]
    cli = run_cli(args + overrides)
    evals = [cb for cb in cli.trainer.callbacks if isinstance(cb, RetainedEval)]
    if not evals:
        raise ValueError(f"{configs} configure no RetainedEval callback; retained and downstream "
                         "scores come from it (add it to trainer.callbacks)")
    return evals[0]


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
    elif command == "continual":
        from .continual import continual

        CLI(continual, args=rest, as_positional=False)
    elif command == "init":
        from .toy.init_model import init_model

        CLI(init_model, args=rest, as_positional=False)
    elif command == "report":
        from .report import report

        CLI(report, args=rest, as_positional=False)
    elif command == "study":
        from .study import study

        CLI(study, args=rest, as_positional=False)
    elif command == "demo":
        from .toy.demo import run_demo

        CLI(run_demo, args=rest, as_positional=False)
    elif command in ("fit", "validate", "test"):
        run_cli(None if from_command_line else argv)
    else:
        sys.exit(f"cfs: unknown command {command!r}\n\n{USAGE}")


if __name__ == "__main__":
    main()
