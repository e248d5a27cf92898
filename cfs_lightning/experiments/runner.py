"""Running `cfs fit|validate|test` (LightningCLI) and the other commands inside this process.

`CFSCLI` links the model's tokenizer to the data and adds the Hugging Face export; `run_fit` is
how the experiments (study, continual) fit, `run_command` how the toy base runs `cfs init`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from ..callbacks import HFExport, RetainedEval
from ..commands import call, overrides as command_overrides, parser_settings
from ..data import ReplayDataModule
from ..training import CausalLMFineTuner

parser_settings()


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


class _Once(logging.Filter):
    """Lets each distinct message of a logger through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.said:
            return False
        self.said.add(key)
        return True


def say_library_notices_once() -> None:
    """A study or continual run fits many times in one process, and Lightning says the same things
    at every Trainer (the accelerators found, a tip, its pytree deprecation): let each through once.
    LightningCLI's warning against `args` beside a command line is left out: the experiments pass
    `args` on purpose, and the command line is the experiment's own."""
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _Once) for f in handler.filters):
            handler.addFilter(_Once())
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    warnings.filterwarnings("once", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run_cli(args: list[str] | None = None, run: bool = True) -> CFSCLI:
    """Run `cfs fit|validate|test ...` in this process and return the CLI (trainer, model, data).

    `args` None reads the command line.
    """
    say_library_notices_once()
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


def run_command(fn, config: str, fields: dict) -> object:
    """Run a command function (`cfs generate`, `cfs init`, ...) with its YAML config and some
    fields replaced (`{"output.dir": ...}`; dotted keys reach nested fields)."""
    return call(fn, ["--config", config, *command_overrides(fields)])


def run_fit(configs: list[str], overrides: list[str], evaluation: RetainedEval | None = None) -> CFSCLI:
    """`cfs fit --config C1 --config C2 ... overrides` in this process; returns the CLI (its
    trainer, model and data).

    The fit must measure retained and downstream scores with a `RetainedEval` callback (see
    `retained_eval`): the configs' own, or `evaluation` in its place (`cfs continual` scores every
    stage on every stage's task).
    """
    args = [a for c in configs for a in ("--config", c)]
    cli = run_cli(args + overrides, run=False)  # built without running: no subcommand
    callbacks = cli.trainer.callbacks
    if evaluation is not None:
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, RetainedEval)] + [evaluation]
    retained_eval(cli, configs)  # refuse before fitting
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def retained_eval(cli: CFSCLI, configs: list[str] | None = None) -> RetainedEval:
    """The fit's `RetainedEval` callback, where its retained and downstream scores are."""
    evals = [cb for cb in cli.trainer.callbacks if isinstance(cb, RetainedEval)]
    if not evals:
        raise ValueError(f"{configs or 'the fit'} configure no RetainedEval callback; retained and downstream "
                         "scores come from it (add it to trainer.callbacks)")
    return evals[0]
