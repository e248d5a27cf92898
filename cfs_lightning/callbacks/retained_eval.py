"""Retained and downstream ability, measured with lm-eval at fit start and after every epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from ..evaluation import evaluate_lm, task_manager_for, task_specs
from ..scores import scored, write_scores
from ..training.sharding import full_params_for_eval, is_sharded

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


class RetainedEval(L.Callback):
    """Runs lm-eval on the in-memory model at fit start and at the end of every `every_n_epochs`.

    Logs `eval/<task>/<metric>` and `forget/<task>/<metric>`: the change since the first
    evaluation (fit start, unless `on_fit_start` is off), signed so that positive means worse (a
    drop of a higher-is-better metric, a rise of a loss). The history is kept in `self.history`,
    written to the run's scores file (`scores.write_scores`), and saved in checkpoints, so a resumed fit keeps
    measuring forgetting against the original start.

    Under DDP or FSDP every process takes part: each scores its share of the documents (all of
    them in every forward pass under FSDP) and the metrics, computed over all documents on rank 0,
    equal a one-process run's up to float round-off. It never runs during the sanity check.
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
        """
        self.tasks, self.suites = list(tasks or []), list(suites or [])
        if not self.tasks and not self.suites:
            raise ValueError("RetainedEval needs at least one entry in tasks or suites")
        task_specs([], self.suites)  # an unknown suite fails now, not after an epoch
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.batch_size, self.limit, self.eval_at_fit_start = batch_size, limit, on_fit_start
        self.max_length, self.add_bos_token, self.every_n_epochs = max_length, add_bos_token, every_n_epochs
        self.baseline: dict[str, float] | None = None
        self.higher_is_better: dict[str, bool] = {}
        """Per `<task>/<metric>`, whether higher is better (as lm-eval's task declares it)."""
        self.history: list[dict[str, Any]] = []
        self._task_manager: TaskManager | None = None
        self._resumed = False

    def evaluate(self, pl_module: L.LightningModule) -> tuple[dict[str, float], dict[str, bool]] | None:
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
                               sharded=is_sharded(pl_module.model) and pl_module.device_mesh is not None)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        values, better = trainer.strategy.broadcast(self.evaluate(pl_module), src=0)
        self.higher_is_better = better
        if self.baseline is None:
            self.baseline = values
        metrics = scored(values, self.baseline, better)
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
        self.baseline, self.history = None, []
        if self.eval_at_fit_start:
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline, self.history = state_dict["baseline"], state_dict["history"]
        self._resumed = True
