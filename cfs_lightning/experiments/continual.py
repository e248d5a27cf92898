"""Sequential continual fine-tuning: one fit per task, in order, each starting where the last ended.

`cfs continual --config C.yaml` runs `cfs fit` with the given fit configs once per stage, the
stage's task in place of the config's, starting from the previous stage's exported model. After
every stage the model is scored with lm-eval on every stage's task (and the retained tasks);
the accuracy matrix R[i][j] (score on task j after stage i) gives, over the T stage tasks,

    average = (1/T) sum_j R[T][j]
    BWT     = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j])

(backward transfer, Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning"),
with the difference negated for lower-is-better metrics so that BWT < 0 always means forgetting.

Replay between stages: the first stage replays what its fit config names. With `fresh_replay`,
each later stage runs a data command (`cfs generate`) on the model it starts from; with
`keep_replay`, it also keeps every earlier stage's replay (merged into one set). With neither,
the first stage's replay is replayed throughout.

A finished stage (its `done.json` written, `runs.mark_done`) is skipped when the command is run again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..callbacks import RetainedEval
from ..commands import overrides
from ..evaluation import load_task_yaml
from ..loading import load_tokenizer
from ..scores import EVAL
from ..shards import merge_shards
from ..tasks import TaskSource
from .runner import retained_eval, run_fit
from .runs import finished, mark_done
from .steps import check_step_command, run_step
from .tables import markdown_table, write_results


@dataclass
class FreshReplay:
    """Replay written by a data command from each later stage's starting model."""

    config: str
    """The command's YAML config; its model and output folder are the stage's (a `fraction`
    budget counts the stage task's training examples)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Fields of the config to replace, dotted (`budget.sequences: 1200`)."""
    command: str = "generate"
    """The data command (`cfs generate`: context-free replay)."""


@dataclass
class Stage:
    """One task of the sequence."""

    name: str
    """Short name; the stage's folder is `<output_dir>/<index>-<name>`."""
    task: TaskSource
    """The task data, replacing `data.init_args.task` of the fit configs."""
    eval_task: str
    """lm-eval task YAML (or registered name) that scores this task."""
    metric: str = "bits_per_byte"
    """The eval task's metric that enters the accuracy matrix."""


def continual(
    fit_configs: list[str],
    stages: list[Stage],
    output_dir: str,
    retained_tasks: list[str] | None = None,
    fresh_replay: FreshReplay | None = None,
    keep_replay: bool = False,
    eval_batch_size: int = 32,
    eval_limit: int | None = None,
    fit_args: list[str] | None = None,
) -> dict:
    """Fine-tune on `stages` in order and report the accuracy matrix, average score and BWT.

    Args:
        fit_configs: `cfs fit` configs (model, regularizers, trainer, data), applied in order.
        stages: The tasks, in training order (at least two).
        output_dir: Stage folders (logs, replay, exported model, done.json) and the final table.
        retained_tasks: lm-eval tasks tracked besides the stages' (e.g. held-out pretraining text).
        fresh_replay: Write fresh replay from each later stage's starting model.
        keep_replay: Keep earlier stages' replay in later stages.
        eval_batch_size: lm-eval batch size.
        eval_limit: Documents per eval task; None: all.
        fit_args: Further `cfs fit` overrides for every stage, e.g. `--trainer.max_steps=50`
            (the stage's task, starting model, replay and output folders are set after them).
    """
    names = [s.name for s in stages]
    if len(stages) < 2 or len(set(names)) != len(names):
        raise ValueError(f"continual needs at least two stages with unique names, got {names}")
    if fresh_replay is not None:
        check_step_command(fresh_replay.command, "continual fresh_replay", data=True)
    out = Path(output_dir)
    evaluation = functools.partial(RetainedEval, tasks=[*(retained_tasks or []), *(s.eval_task for s in stages)],
                                   batch_size=eval_batch_size, limit=eval_limit)
    results, replays = [], []
    for i, stage in enumerate(stages):
        folder = out / f"{i + 1:02d}-{stage.name}"
        start = None if i == 0 else str(out / f"{i:02d}-{stages[i - 1].name}" / "hf_model")
        replay = _stage_replay(folder, start, stage.task, replays, fresh_replay, keep_replay)
        result = finished(folder, stage=stage.name)
        if result is not None:
            print(f"stage {i + 1} ({stage.name}): done, skipped")
        else:
            result = _fit_stage(fit_configs, stage, folder, start, replay, evaluation(on_fit_start=i == 0),
                                fit_args or [])
        results.append(result)
        # A stage's own replay: the config's (first stage) or the fresh set it wrote.
        replays.append(result["replay"] if i == 0 else str(folder / "replay_fresh") if fresh_replay else None)
    summary = summarize(stages, results)
    write_results(out, summary, summary["table"])
    return summary


def _stage_replay(folder: Path, start: str | None, task: TaskSource, earlier: list[str | None],
                  fresh: FreshReplay | None, keep: bool) -> str | None:
    """The replay directory of a stage; None: the fit config's own (first stage, or neither option)."""
    if start is None or not (fresh or keep):
        return None
    parts = [p for p in earlier if p is not None] if keep else []
    if fresh is not None:
        own = folder / "replay_fresh"
        if not (own / "manifest.json").is_file():
            run_step(fresh.command, [fresh.config], start, own, overrides(fresh.args), task)
        parts.append(str(own))
    if len(parts) == 1:
        return parts[0]
    merged = folder / "replay"
    if not (merged / "manifest.json").is_file():
        merge_shards(parts, merged, load_tokenizer(start))
    return str(merged)


def _fit_stage(fit_configs: list[str], stage: Stage, folder: Path, start: str | None, replay: str | None,
               evaluation: RetainedEval, fit_args: list[str]) -> dict:
    """Fit one stage; its record (replay, scores before and after, their directions) in `done.json`."""
    began = time.perf_counter()
    args = [*fit_args, f"--data.init_args.task={json.dumps(dataclasses.asdict(stage.task))}",
            f"--trainer.logger.init_args.save_dir={folder / 'logs'}", f"--export.dirpath={folder / 'hf_model'}"]
    if start is not None:  # later stages replay earlier models' samples, on purpose
        args += [f"--model.init_args.pretrained={start}", "--data.init_args.replay.strict=false"]
    if replay is not None:
        args.append(f"--data.init_args.replay.dir={replay}")
    cli = run_fit(fit_configs, args, evaluation)
    evals, data = retained_eval(cli), cli.datamodule
    return mark_done(folder, began, stage=stage.name, replay=data.replay.dir if data.replay is not None else None,
                     before=evals.history[0] if evals.eval_at_fit_start else None,
                     after=evals.history[-1], higher_is_better=evals.higher_is_better)


def _task_name(eval_task: str) -> str:
    path = Path(eval_task)
    if path.suffix in (".yaml", ".yml"):
        return load_task_yaml(path)["task"]
    return eval_task


def summarize(stages: list[Stage], results: list[dict]) -> dict:
    """Accuracy matrix, average final score and backward transfer (see the module docstring)."""
    keys = [f"{_task_name(s.eval_task)}/{s.metric}" for s in stages]
    better = results[-1]["higher_is_better"]
    missing = [k for k in keys if k not in better]
    if missing:
        raise KeyError(f"eval metrics {missing} were not logged; logged: {sorted(better)}")
    matrix = [[r["after"][f"{EVAL}{k}"] for k in keys] for r in results]
    sign = [1.0 if better[k] else -1.0 for k in keys]
    last = len(stages) - 1
    bwt = sum(sign[j] * (matrix[last][j] - matrix[j][j]) for j in range(last)) / last
    extra = sorted(k for k in results[-1]["after"] if k.startswith(EVAL) and k[len(EVAL):] not in keys)
    rows = ([("base", results[0]["before"])] if results[0]["before"] else []) + \
        [(f"after {s.name}", r["after"]) for s, r in zip(stages, results, strict=True)]
    cols = [f"{EVAL}{k}" for k in keys] + extra
    average = sum(matrix[last]) / len(keys)
    table = markdown_table(["model", *(c[len(EVAL):] for c in cols)],
                           [[name] + [f"{h[c]:.4f}" for c in cols] for name, h in rows])
    table += (f"\n\naverage final score over the {len(keys)} stage tasks: {average:.4f}; "
              f"BWT: {bwt:+.4f} (negative: forgetting)\n")
    return {"tasks": keys, "matrix": matrix, "higher_is_better": [better[k] for k in keys],
            "average": average, "bwt": bwt, "table": table, "stages": results}
