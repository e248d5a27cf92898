"""Retained and downstream ability, measured with lm-eval at fit start and after every epoch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..evaluation import Evaluation, evaluate_lm, task_manager_for, task_specs
from ..io import write_text
from ..scores import item_changes, scored, write_scores
from ..training.sharding import full_params_for_eval, is_sharded

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def tasks_key(tasks: list[str], suites: list[str] = ()) -> list:
    """The tasks as JSON, for `start_scores`' key: a task's functions (lm-eval's `!function`) by
    module and name, since their repr holds a memory address that differs between processes."""
    def describe(value: Any) -> str:
        name = getattr(value, "__qualname__", None)
        return f"{value.__module__}.{name}" if callable(value) and name else str(value)

    return json.loads(json.dumps(task_specs(tasks, suites), sort_keys=True, default=describe))


class RetainedEval(L.Callback):
    """Runs lm-eval on the in-memory model at fit start and at the end of every `every_n_epochs`.

    Logs `eval/<task>/<metric>` and `forget/<task>/<metric>`: the change since the first
    evaluation (fit start, unless `on_fit_start` is off), signed so that positive means worse (a
    drop of a higher-is-better metric, a rise of a loss), and with `per_item` the per-item
    forgetting of every metric scored 0 or 1 per document, `items/<task>/<metric>/<change>`
    (`scores.item_changes`: the share of documents right at the first evaluation and wrong now,
    the reverse, and both adjusted for guessing). The history is kept in `self.history`,
    written to the run's scores file (`scores.write_scores`), and saved in checkpoints, so a resumed fit keeps
    measuring forgetting against the original start.

    Under DDP or FSDP every process takes part: each scores its share of the documents (all of
    them in every forward pass under FSDP) and the metrics, computed over all documents on rank 0,
    equal a one-process run's up to float round-off. It never runs during the sanity check.

    `start_scores` lets the fits of a study share one evaluation of their base model: the file
    keeps each fit-start evaluation under a key of everything it depends on (a digest of the
    model's weights as evaluated, its tokenizer, the task configs, `limit`, `batch_size`,
    `max_length`, `add_bos_token`, the trainer's precision), and a fit whose key is there takes
    those scores instead of evaluating again (the RNG is untouched either way, so the fit itself is
    the same). A method that changes the model before training (LoRA adds weights) gets its own
    key. The task data itself is not in the key: point each study at its own file. One process
    only; a distributed fit evaluates as usual.
    """

    def __init__(
        self,
        tasks: list[str] | None = None,
        suites: list[str] | None = None,
        batch_size: int = 16,
        limit: int | float | None = None,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        every_n_epochs: int = 1,
        on_fit_start: bool = True,
        start_scores: str | None = None,
        per_item: bool = True,
    ) -> None:
        """
        Args:
            tasks: Registered lm-eval task names, or paths of task YAML files (`configs/tasks/*.yaml`).
            suites: Named suites added to `tasks` (`cfs_lightning.evaluation.SUITES`):
                `olmo_zero_shot` (arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa,
                sciq, winogrande), `gsm8k`.
            batch_size: lm-eval batch size.
            limit: Documents per task (int) or fraction of them (float); None: all.
            max_length: Context length for lm-eval; default: the model's.
            add_bos_token: Passed to lm-eval's HFLM; None keeps the tokenizer's own behaviour.
            every_n_epochs: Evaluate after every n-th training epoch.
            on_fit_start: Also evaluate before training (the baseline of `forget/`).
            start_scores: A JSON file of fit-start evaluations to reuse and add to (see above).
            per_item: Also log per-item forgetting (lm-eval keeps each document's outcome).
        """
        self.tasks, self.suites = list(tasks or []), list(suites or [])
        if not self.tasks and not self.suites:
            raise ValueError("RetainedEval needs at least one entry in tasks or suites")
        task_specs([], self.suites)  # an unknown suite fails now, not after an epoch
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.batch_size, self.limit, self.eval_at_fit_start = batch_size, limit, on_fit_start
        self.max_length, self.add_bos_token, self.every_n_epochs = max_length, add_bos_token, every_n_epochs
        self.start_scores = Path(start_scores).expanduser() if start_scores else None
        self.per_item = per_item
        self.baseline: dict[str, float] | None = None
        self.baseline_items: dict[str, dict[str, list[float]]] = {}
        """Per document, each 0-or-1 metric's outcome at the first evaluation (`per_item`)."""
        self.higher_is_better: dict[str, bool] = {}
        """Per `<task>/<metric>`, whether higher is better (as lm-eval's task declares it)."""
        self.history: list[dict[str, Any]] = []
        self._task_manager: TaskManager | None = None
        self._resumed = False

    def evaluate(self, pl_module: L.LightningModule) -> Evaluation | None:
        """Scores of the module's model now (its evaluation weights, e.g. an EMA average).

        In a distributed run every rank must call it; the scores come back on rank 0 only.
        """
        specs = task_specs(self.tasks, self.suites)
        if self._task_manager is None:
            self._task_manager = task_manager_for(specs)
        root = pl_module.trainer.strategy.model if pl_module._trainer is not None else pl_module
        with pl_module.evaluation_weights(), full_params_for_eval(root):
            # FSDP2 units gather in their own forward: every rank must run each forward pass.
            return evaluate_lm(pl_module.hf_model, pl_module.tokenizer, specs, self.batch_size,
                               self.limit, self.max_length, self.add_bos_token, self._task_manager,
                               sharded=is_sharded(pl_module.model) and pl_module.device_mesh is not None,
                               items=self.per_item)

    def _start_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What a fit-start evaluation depends on (`start_scores`)."""
        weights = hashlib.blake2b(digest_size=16)
        with pl_module.evaluation_weights():
            for name, tensor in sorted(pl_module.hf_model.state_dict().items()):
                weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        tok = pl_module.tokenizer
        return {"weights": weights.hexdigest(), "model": type(pl_module.hf_model).__name__,
                "tokenizer": [type(tok).__name__, len(tok), getattr(tok, "chat_template", None)],
                "tasks": tasks_key(self.tasks, self.suites),
                "limit": self.limit, "batch_size": self.batch_size, "max_length": self.max_length,
                "add_bos_token": self.add_bos_token, "precision": str(trainer.precision)}

    def _start_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The fit-start scores: from `start_scores` when it holds this evaluation, else evaluated
        (and added to it)."""
        if self.start_scores is None or trainer.world_size > 1:
            return self.evaluate(pl_module)
        key = self._start_key(trainer, pl_module)
        try:
            entries = json.loads(self.start_scores.read_text()) if self.start_scores.exists() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"RetainedEval start_scores: {self.start_scores} is not valid JSON ({err}); "
                             "delete it and the fit-start evaluation runs again") from err
        same = [entry for entry in entries if entry["key"] == key]
        if same and ("items" in same[0] or not self.per_item):
            rank_zero_info(f"RetainedEval: fit-start scores reused from {self.start_scores} (same model and tasks)")
            return Evaluation(same[0]["scores"], same[0]["higher_is_better"], same[0].get("items", {}))
        result = self.evaluate(pl_module)  # an entry without per-item outcomes is replaced
        entries = [entry for entry in entries if entry["key"] != key]
        entries.append({"key": key, "scores": result.values, "higher_is_better": result.better,
                        **({"items": result.items} if self.per_item else {})})
        write_text(self.start_scores, json.dumps(entries, indent=1) + "\n")
        return result

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, start: bool = False) -> dict[str, float]:
        result = self._start_evaluation(trainer, pl_module) if start else self.evaluate(pl_module)
        values, better, items = trainer.strategy.broadcast(result, src=0)
        self.higher_is_better = better
        if self.baseline is None:
            self.baseline, self.baseline_items = values, items
        metrics = scored(values, self.baseline, better) | item_changes(self.baseline_items, items)
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        log_dir = trainer.log_dir  # a collective call under some strategies: every rank asks
        if trainer.is_global_zero and log_dir:
            write_scores(log_dir, self.history)
        return metrics

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._task_manager is None:  # an unknown task name fails now, before any training
            self._task_manager = task_manager_for(task_specs(self.tasks, self.suites))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resumed:  # keep the restored baseline and history
            self._resumed = False
            return
        self.baseline, self.baseline_items, self.history = None, {}, []
        if self.eval_at_fit_start:
            self._run(trainer, pl_module, start=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "history": self.history, "baseline_items": self.baseline_items}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline, self.history = state_dict["baseline"], state_dict["history"]
        self.baseline_items = state_dict.get("baseline_items", {})  # none in checkpoints of earlier versions
        self._resumed = True
