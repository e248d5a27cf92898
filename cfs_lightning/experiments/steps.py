"""Running a `cfs` command as a step of `cfs study` or `cfs continual`: on a given model, into a
given folder, its config's fields overridden (`commands.Command` names which arguments those are)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..commands import COMMANDS, call, function
from ..tasks import TaskSource


@dataclass
class DataStep:
    """A data-side `cfs` command run once for the whole study (replay or rewritten task data)."""

    name: str
    """Folder under `<output_dir>/data/`; methods refer to it as `{data.<name>}`."""
    command: str
    """A data command of `cfs --help`, one that writes shards (`commands.COMMANDS`, `data=True`)."""
    config: str
    """The command's YAML config; its model (`base.model` or `tokenizer`) and output folder are the study's."""
    args: dict[str, Any] = field(default_factory=dict)
    """Fields of the config to replace, dotted (`budget.sequences: 64`)."""
    minutes: float | None = None
    """How long the step is expected to take, for the progress line's estimate of the rest."""


def check_step_command(command: str, where: str, data: bool = False) -> None:
    """Refuse a command that cannot run as a step (or, with `data`, one that writes no shards)."""
    names = [n for n, c in COMMANDS.items() if c.output_arg is not None and (c.data or not data)]
    if command not in names:
        raise ValueError(f"{where}: {command!r} cannot run as a step here; one of {sorted(names)}")


def run_step(command: str, configs: list[str], model: str, out: Path, overrides: list[str] = (),
             task: TaskSource | None = None) -> Any:
    """`cfs <command> --config C... --<model>=model overrides --<output>=out` in this process
    (with `task`, also the command's task argument: `cfs continual` gives each stage's)."""
    spec = COMMANDS[command]
    args = [a for c in configs for a in ("--config", c)]
    args += [f"--{spec.model_arg}={model}", *overrides, f"--{spec.output_arg}={out}"]
    if task is not None and spec.task_arg is not None:
        args.append(f"--{spec.task_arg}={json.dumps(dataclasses.asdict(task))}")
    return call(function(command), args)
