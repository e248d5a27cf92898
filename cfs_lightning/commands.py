"""The `cfs` commands: one table of `name -> (module:function, help)`, resolved lazily.

Nothing here imports torch: `cfs --help` reads the table alone, and `cfs <command>` imports only
the module its function lives in (no lm-eval for `cfs generate`, no lightning for `cfs report`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    target: str
    """`module:function`, the module relative to the package."""
    help: str
    """One line for `cfs --help`."""
    data: bool = False
    """A data command (writes a data folder: shards, or `cfs fisher`'s estimate); `cfs study` runs
    these as its data steps."""
    lightning: bool = False
    """A LightningCLI subcommand: the function takes the whole command line."""
    model_arg: str | None = None
    """The argument naming the model it reads (`base.model`, `tokenizer`), which `cfs study` and
    `cfs continual` set; None: the command cannot be one of their steps."""
    output_arg: str | None = None
    """The argument naming the folder it writes (`output.dir`, `output_dir`)."""
    task_arg: str | None = None
    """The argument taking the task's data, where it has one (`cfs continual` gives each stage's)."""


COMMANDS: dict[str, Command] = {
    "fit": Command("experiments.runner:run_cli", "train a model (LightningCLI; `cfs fit --help`)", lightning=True),
    "validate": Command("experiments.runner:run_cli", "validate a model (LightningCLI)", lightning=True),
    "test": Command("experiments.runner:run_cli", "test a model (LightningCLI)", lightning=True),
    "generate": Command("replay.context_free:generate", "write context-free replay shards from a base model",
                        data=True, model_arg="base.model", output_arg="output.dir", task_arg="task"),
    "contextual": Command("replay.contextual:contextual",
                          "write contextual replay: the base model continuing the task prompts", data=True,
                          model_arg="base.model", output_arg="output.dir", task_arg="task"),
    "corpus": Command("replay.corpus:corpus", "write replay shards of real text (a corpus)", data=True,
                      model_arg="tokenizer", output_arg="output.dir"),
    "dialogue": Command("replay.dialogue:dialogue",
                        "write self-dialogue replay: the base model talking with itself", data=True,
                        model_arg="base.model", output_arg="output.dir"),
    "fisher": Command("replay.fisher:fisher",
                      "estimate the base model's diagonal Fisher on its replay sequences (for EWC)", data=True,
                      model_arg="base.model", output_arg="output.dir"),
    "self-output": Command("rewrite.self_output:self_output",
                           "rewrite the task's targets with the base model's verified answers", data=True,
                           model_arg="base.model", output_arg="output.dir", task_arg="task"),
    "rephrase": Command("rewrite.self_output:rephrase",
                        "rewrite the task's targets with the base model's verified rephrasings", data=True,
                        model_arg="base.model", output_arg="output.dir", task_arg="task"),
    "token-mask": Command("rewrite.token_mask:token_mask_command",
                          "drop the task's high-perplexity tokens from the loss (STM)", data=True,
                          model_arg="base.model", output_arg="output.dir", task_arg="task"),
    "continual": Command("experiments.continual:continual",
                         "fine-tune on a sequence of tasks; report average score and BWT"),
    "interpolate": Command("experiments.wise_ft:interpolate",
                           "WiSE-FT: evaluate weight interpolations of a base and a fine-tuned model",
                           model_arg="base", output_arg="output_dir"),
    "fetch": Command("checkpoints:fetch",
                     "download, verify and convert the real checkpoints cfs_lightning knows (SmolLM2, Gemma-3)"),
    "convert": Command("checkpoints:convert", "write a GGUF checkpoint as a safetensors model folder"),
    "init": Command("experiments.init_model:init_model",
                    "train a BPE tokenizer and write a randomly initialised model"),
    "report": Command("experiments.report:report", "tables and plots comparing runs, from their logs"),
    "study": Command("experiments.study:study",
                     "fit a list of methods x seeds on one base model and task, then report (the demo is one)"),
}


def function(name: str) -> Callable[..., Any]:
    """The function `cfs <name>` runs, its module imported now."""
    if name not in COMMANDS:
        raise KeyError(f"unknown cfs command {name!r}; one of {', '.join(COMMANDS)}")
    module, _, attr = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


def parser_settings() -> None:
    """Config dataclasses document their fields with attribute docstrings; show them in --help."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def call(fn: Callable[..., Any], args: list[str]) -> Any:
    """Run a command function on a command line (`--config X.yaml --key=value ...`)."""
    from jsonargparse import CLI

    parser_settings()
    return CLI(fn, args=args, as_positional=False)


def overrides(fields: dict[str, Any]) -> list[str]:
    """Config fields to replace as command-line overrides: `{"a.b": 1}` -> `["--a.b=1"]` (dotted
    keys reach nested fields)."""
    return [f"--{k}={v}" for k, v in fields.items()]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cfs COMMAND --config FILE.yaml [--key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {c.help}" for name, c in COMMANDS.items()]
    lines += ["", "Every command takes --config, dotted overrides (--a.b=c), --help and --print_config."]
    return "\n".join(lines) + "\n"
