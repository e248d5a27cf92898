"""The LightningModule: a causal LM fine-tuned on its task loss plus a list of regularizers."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, AutoTokenizer

from .losses import mean_token_nll, token_nll
from .regularizers import NLLReplay, Regularizer

VAL_KEYS = {"task": "task_loss", "replay": "replay_nll"}
"""Validation log key per stream: `val/task_loss` and `val/replay_nll` (nats per token)."""


class CausalLMFineTuner(L.LightningModule):
    """Fine-tunes any Hugging Face causal LM on `task_loss + sum_i weight_i * regularizer_i`.

    Every training batch is a dict of streams (`task`, and `replay` when the DataModule mixes it
    in). The task loss is the response-masked NLL; each regularizer's term is logged under
    `train/reg/<name>`, their weighted sum with the task loss under `train/loss`.
    """

    def __init__(
        self,
        pretrained: str,
        regularizers: list[Regularizer] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            pretrained: Hub model name or local directory, loaded with `from_pretrained`.
            regularizers: Terms added to the task loss, e.g. `NLLReplay`.
            optimizer: Optimizer over the trainable parameters.
            lr_scheduler: Optional scheduler, stepped every optimizer step.
            tokenizer: Tokenizer name or directory; default: `pretrained`.
            dtype: Weight dtype to load (`float32`, `bfloat16`, ...); default float32. Use the
                trainer's `precision` for mixed precision.
            trust_remote_code: Allow model code shipped with the checkpoint to run.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["regularizers", "optimizer", "lr_scheduler"])
        self.regularizers = list(regularizers or [])
        names = [r.name for r in self.regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique, got {names}; set `name` on each")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model = AutoModelForCausalLM.from_pretrained(
            pretrained,
            dtype=getattr(torch, dtype) if dtype else torch.float32,
            trust_remote_code=trust_remote_code,
        ).train()  # from_pretrained returns eval mode; Lightning keeps modules' modes as given
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer or pretrained, trust_remote_code=trust_remote_code
        )
        self.val_nll = nn.ModuleDict({s: MeanMetric() for s in VAL_KEYS})
        self.test_nll = nn.ModuleDict({s: MeanMetric() for s in VAL_KEYS})

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _logits(self, batch: dict, streams: set[str]) -> dict[str, torch.Tensor]:
        missing = streams - batch.keys()
        if missing:
            users = [r.name for r in self.regularizers if set(r.streams) & missing]
            raise KeyError(
                f"regularizers {users} need the {sorted(missing)} stream, but the batch has only "
                f"{sorted(batch)}: give the DataModule replay shards (data.replay.dir) and "
                "data.replay_ratio > 0"
            )
        return {s: self(batch[s]["input_ids"], batch[s]["attention_mask"]) for s in streams}

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            for reg in self.regularizers:
                reg.setup(self)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        streams = {"task"}.union(*(r.streams for r in self.regularizers))
        outputs = self._logits(batch, streams)
        task_loss = mean_token_nll(outputs["task"], batch["task"]["labels"])
        logs, loss = {"train/task_loss": task_loss}, task_loss
        for reg in self.regularizers:
            term = reg(batch, outputs)
            logs[f"train/reg/{reg.name}"] = term
            loss = loss + reg.weight * term
        batch_size = batch["task"]["input_ids"].size(0)
        self.log_dict(logs, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for reg in self.regularizers:
            reg.on_after_optimizer_step(self)

    def _eval_step(self, batch: dict, metrics: nn.ModuleDict, prefix: str) -> None:
        ((stream, b),) = batch.items()
        total, count = token_nll(self(b["input_ids"], b["attention_mask"]), b["labels"])
        metrics[stream].update(total / count, weight=count)  # token-weighted over the epoch
        self.log(f"{prefix}/{VAL_KEYS[stream]}", metrics[stream], add_dataloader_idx=False)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_nll, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_nll, "test")

    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class CFSFineTuner(CausalLMFineTuner):
    """Context-free replay preset: the task loss plus `replay_weight` x NLL on replay sequences.

    Equivalent to `CausalLMFineTuner` with `regularizers: [NLLReplay(weight=replay_weight)]`;
    further regularizers given in `regularizers` are added after it.
    """

    def __init__(self, pretrained: str, replay_weight: float = 1.0,
                 regularizers: list[Regularizer] | None = None, **kwargs) -> None:
        """
        Args:
            pretrained: Hub model name or local directory, loaded with `from_pretrained`.
            replay_weight: Weight of the replay NLL term.
            regularizers: Extra terms added after the replay NLL.
        """
        preset = [NLLReplay(weight=replay_weight)]
        super().__init__(pretrained, regularizers=preset + list(regularizers or []), **kwargs)
