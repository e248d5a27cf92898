"""Retained and downstream ability, measured with lm-eval at fit start and after every epoch."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_task_yaml(path: str | Path) -> dict[str, Any]:
    """An lm-eval task config from a YAML file, its relative `data_files` made absolute.

    lm-eval resolves relative `data_files` against the working directory; here they resolve
    against the YAML's own folder, so a task file works from wherever the run starts.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task file {path} not found")
    cfg = load_yaml(path)
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if files is not None:
        cfg["dataset_kwargs"]["data_files"] = _absolute(files, path.parent)
    return cfg


def _absolute(files: str | list | dict, base: Path) -> str | list | dict:
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    return str(base / files)


def _flatten(results: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval results -> ({"<task>/<metric>": value}, {"<task>/<metric>": higher_is_better})."""
    values, better = {}, {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # metric keys read "<metric>,<filter>"
            if not comma or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}_{filt}"
            values[name] = float(value)
            better[name] = bool(results["higher_is_better"][task].get(metric, False))
    return values, better


def task_specs(tasks: list[str]) -> list[str | dict]:
    """lm-eval task names as given, task YAML paths loaded (`load_task_yaml`)."""
    return [load_task_yaml(t) if t.endswith((".yaml", ".yml")) else t for t in tasks]


def task_manager_for(tasks: list[str | dict]) -> TaskManager:
    """A TaskManager that indexes lm-eval's built-in tasks (seconds) only when a name needs it."""
    return TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))


def evaluate_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str | dict],
    batch_size: int = 16,
    limit: int | float | None = None,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    task_manager: TaskManager | None = None,
) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval scores of an in-memory model: ({"<task>/<metric>": value}, {...: higher_is_better}).

    The model's train/eval mode and the Python, NumPy and torch RNG states are left as they were.
    """
    if task_manager is None:
        task_manager = task_manager_for(tasks)
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=max_length, add_bos_token=add_bos_token)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            results = simple_evaluate(
                model=lm, tasks=tasks, limit=limit, bootstrap_iters=0, log_samples=False,
                task_manager=task_manager, random_seed=None, numpy_random_seed=None,
                torch_random_seed=None,
            )
    finally:
        model.train(was_training)  # lm-eval calls model.eval()
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _flatten(results)


class RetainedEval(L.Callback):
    """Runs lm-eval on the in-memory model at fit start and at the end of every `every_n_epochs`.

    Logs `eval/<task>/<metric>` and `forget/<task>/<metric>`: the change since fit start, signed
    so that positive means worse (a drop of a higher-is-better metric, a rise of a loss). The
    history is kept in `self.history` and written to `<log_dir>/retained_eval.json`.
    """

    def __init__(
        self,
        tasks: list[str],
        batch_size: int = 16,
        limit: int | float | None = None,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        """
        Args:
            tasks: Registered lm-eval task names, or paths of task YAML files (`configs/tasks/*.yaml`).
            batch_size: lm-eval batch size.
            limit: Documents per task (int) or fraction of them (float); None: all.
            max_length: Context length for lm-eval; default: the model's.
            add_bos_token: Passed to lm-eval's HFLM; None keeps the tokenizer's own behaviour.
            every_n_epochs: Evaluate after every n-th training epoch.
        """
        if not tasks:
            raise ValueError("RetainedEval needs at least one task")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.tasks, self.batch_size, self.limit = tasks, batch_size, limit
        self.max_length, self.add_bos_token, self.every_n_epochs = max_length, add_bos_token, every_n_epochs
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self._task_manager: TaskManager | None = None

    def evaluate(self, pl_module: L.LightningModule) -> tuple[dict[str, float], dict[str, bool]]:
        """Scores of the module's model now (its evaluation weights, e.g. an EMA average)."""
        specs = task_specs(self.tasks)
        if self._task_manager is None:
            self._task_manager = task_manager_for(specs)
        with pl_module.evaluation_weights():
            return evaluate_lm(pl_module.hf_model, pl_module.tokenizer, specs, self.batch_size,
                               self.limit, self.max_length, self.add_bos_token, self._task_manager)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        scores = self.evaluate(pl_module) if trainer.is_global_zero else None
        values, better = trainer.strategy.broadcast(scores, src=0)
        if self.baseline is None:
            self.baseline = values
        metrics = {f"eval/{k}": v for k, v in values.items()}
        for k, v in values.items():
            delta = v - self.baseline[k]
            metrics[f"forget/{k}"] = -delta if better[k] else delta
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero and trainer.log_dir:
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.log_dir) / "retained_eval.json").write_text(json.dumps(self.history, indent=2))
        return metrics

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.baseline, self.history = None, []
        self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)
