"""The LightningModule: a causal LM fine-tuned on its task loss plus a list of regularizers."""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import PreTrainedModel

from ..loading import load_causal_lm, load_tokenizer
from ..shards import check_model
from ..streams import TASK, StepContext, StreamProducer, missing_streams
from ..tokens import pad_token_id
from .heads import Logits, head_splits, split_logits
from .lora import LoRA, apply_lora, save_hf, unwrap
from .losses import NORMALIZATIONS
from .nonfinite import NonFiniteGuard
from .producers import add_rows, check_streams
from .reference import FrozenReference, build_reference, resolve_reference_mode
from .regularizers import Regularizer
from .regularizers.base import checkpoint_states, restore_states
from .sharding import data_parallel_mesh, gathered_copy, is_sharded, shard_fsdp2
from .task_losses import NLL, TaskLoss, check_task_loss, task_terms
from .trainable import Trainable, apply_trainable
from .validation import EvalMetrics


class CausalLMFineTuner(L.LightningModule):
    """Fine-tunes any Hugging Face causal LM on `task_loss + sum_i weight_i * regularizer_i`.

    Every training batch is a dict of streams (`cfs_lightning.streams`): `task`, and what its
    producers add (the DataModule's `replay`, rows a callback such as `OnlineReplay` samples),
    checked against what the loss terms read when the fit starts and merged into each batch at
    its start (`producers.py`). `train/task_loss` is always the task's plain NLL, so that runs
    compare; another task loss is logged as `train/task_<name>`, each term as
    `train/reg/<name>`, the weighted sum as `train/loss`; validation as `validation.py` says.
    The losses read each stream as a `heads.Logits` (`logits`): no (B, T, V) tensor is formed.

    Args:
        pretrained: Hub model name or local directory, loaded with `from_pretrained`.
        regularizers: Terms added to the task loss, e.g. `NLLReplay`.
        optimizer: Optimizer over the trainable parameters.
        lr_scheduler: Optional scheduler, stepped every optimizer step.
        tokenizer: Tokenizer name or directory; default: `pretrained`.
        dtype: Weight dtype to load; default float32 (mixed precision: the trainer's `precision`).
        trust_remote_code: Allow model code shipped with the checkpoint to run.
        reference: The frozen reference for whatever reads it (`KLToReference`, `OnlineReplay`
            sampling from the base): `copy` (a frozen copy of the weights the first fit or
            evaluation starts from), `adapters_disabled` (with LoRA: the same weights, adapters
            off, no second copy), `none`, or `auto`: none unless something needs it, then
            `adapters_disabled` with LoRA and `copy` without. With a reference, validation also
            logs the forgetting meter (`val/replay_kl`, `val/task_kl`; `copy` measures it anywhere).
        lora: Train low-rank adapters (peft) instead of all weights; the export then holds the
            merged model and, under `adapter/`, the adapter alone.
        nonfinite: What a NaN or infinite loss term does (`nonfinite.py`): `stop` saves
            `last.ckpt` and raises an error naming the step, the term and its stream; `skip`
            drops the batch.
        task_loss: The loss on the task's response tokens, a `task_losses.TaskLoss`: `NLL`
            (the default), `DFT`, `EAFT` (docs/methods.md). `null`: the regularizers are the whole
            loss (SDFT); `train/task_loss` is still logged, without gradient.
        normalize: What the task loss and every term, each a sum over its stream's target
            positions, are divided by: `token`, the number of target tokens (nats per token), or
            `sequence`, the number of sequences (the CFS objective E_F[-log p(y|x)] +
            lambda E_x[-log p(x)] of arXiv 2505.13811, as configs/paper/ uses). See
            docs/methods.md; validation stays per token.
        activation_checkpointing: Recompute each decoder block in the backward pass (less memory,
            more compute); under FSDP1 the strategy's `activation_checkpointing_blocks` instead.
        trainable: Freeze weights by name or the bottom blocks, or add blocks that alone train
            (LLaMA-Pro): `trainable.Trainable`; None: every weight trains.
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
        reference: Literal["auto", "none", "copy", "adapters_disabled"] = "auto",
        lora: LoRA | None = None,
        nonfinite: Literal["stop", "skip"] = "stop",
        task_loss: TaskLoss | None = NLL(),
        normalize: Literal["token", "sequence"] = "token",
        activation_checkpointing: bool = False,
        trainable: Trainable | None = None,
    ) -> None:
        super().__init__()
        self.regularizers = list(regularizers or [])
        self._check_objective(task_loss, normalize)
        self.nonfinite = NonFiniteGuard(nonfinite)
        # The task loss, like the regularizers, is configuration the checkpoint does not need.
        self.save_hyperparameters(ignore=["regularizers", "optimizer", "lr_scheduler", "task_loss"])
        self.task_loss, self.lora = task_loss, lora
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        resolve_reference_mode(reference, self._reference_users([]), lora is not None)  # refused now, not at fit
        # from_pretrained returns eval mode; Lightning keeps modules' modes as given
        model = load_causal_lm(pretrained, dtype, trust_remote_code).train()
        if trainable is not None:
            apply_trainable(model, trainable, lora=lora is not None)
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = apply_lora(model, lora) if lora is not None else model
        self.tokenizer = load_tokenizer(tokenizer or pretrained, trust_remote_code)
        self.head_split = head_splits(self.model, self.hf_model)
        # A plain attribute, not a submodule: never in the optimizer, state_dict or checkpoints.
        self.reference: FrozenReference | None = None  # built by `setup`, once its users are known
        self.producers: list[StreamProducer] = []  # what adds rows to the training batches
        self.evaluation = EvalMetrics()

    def _check_objective(self, task_loss: TaskLoss | None, normalize: str) -> None:
        """Refuse a loss that cannot be formed, naming the fix."""
        check_task_loss(task_loss, any(r.adds_term for r in self.regularizers))
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"model.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        names = [r.name for r in self.regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique, got {names}; set `name` on each")

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Logits:
        """The next-token logits of a batch as the losses read them: (B, T, H) final hidden
        states and the output head (`heads.split_logits`), so that no (B, T, V) tensor is formed;
        the (B, T, V) logits themselves where the head does not split off (`head_split`)."""
        if self.head_split and not isinstance(self.model, FullyShardedDataParallel):
            return split_logits(self.model, self.hf_model, input_ids, attention_mask)
        return Logits(self(input_ids, attention_mask))

    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model being trained (LoRA layers included when `lora` is set)."""
        model = self.model.module if isinstance(self.model, FullyShardedDataParallel) else self.model
        return unwrap(model)

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._check_fit_inputs()
        if self.reference is None:  # once: from the weights the first fit or evaluation starts from
            self.reference = build_reference(self.model, self.hparams.reference,
                                             self._reference_users(self.producers), self.lora is not None)

    def _check_fit_inputs(self) -> None:
        """Refuse shards (or a term's data) of another base model, and producers that do not match
        the readers. Checked while the weights are still the base's, unsharded; the DataModule,
        which read the shards, lists them in `shard_manifests` (or has none)."""
        datamodule = self.trainer.datamodule
        for where, (manifest, waiver) in getattr(datamodule, "shard_manifests", {}).items():
            check_model(manifest, self.hf_model, where, waiver)
        for reg in self.regularizers:
            reg.check_base(self.hf_model)
        self.producers = [p for p in (datamodule, *self.trainer.callbacks) if isinstance(p, StreamProducer)]
        check_streams(self.producers, self.regularizers)
        if isinstance(datamodule, StreamProducer):  # every stream is declared: one missing is known now
            self._require_streams({s for p in self.producers for s in p.streams}, "the producers add")

    def _reference_users(self, producers: list[StreamProducer]) -> list[str]:
        return ([f"regularizer {r.name}" for r in self.regularizers if r.needs_reference]
                + [p.describe() for p in producers if p.needs_reference])

    def _require_streams(self, present: Collection[str], where: str) -> None:
        """Refuse a batch without a stream that the task loss or a term reads, naming its source."""
        readers = {"the task loss": (TASK,), **{r.name: r.reads for r in self.regularizers if r.adds_term}}
        error = missing_streams(readers, present, where)
        if error is not None:
            raise KeyError(error)

    def configure_model(self) -> None:
        # FSDP2 (ModelParallelStrategy) hands us a device mesh: shard per decoder block here,
        # the frozen reference in units of its own. Later stages find the model already sharded.
        if self.device_mesh is not None and not is_sharded(self.model):
            mesh = data_parallel_mesh(self.device_mesh)
            shard_fsdp2(self.hf_model, mesh)  # the transformers model is the root unit, also under LoRA
            if self.reference is not None:
                self.reference.shard(mesh)
        # Regularizers snapshot theta_0 / averages here: after the model exists in its final
        # (possibly sharded) form and before a checkpoint is restored over it.
        if self._trainer is not None and self.trainer.state.fn == "fit":
            for reg in self.regularizers:
                reg.normalize = self.hparams.normalize  # every term normalized as the task loss is
                reg.setup(self)

    def on_fit_start(self) -> None:
        # A `trainer.validate` before the fit left the metrics' states as inference tensors,
        # which the fit's validation (no_grad, not inference mode) cannot update in place.
        self.evaluation.reset("val")
        if self.reference is not None:
            dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
            self.reference.to(self.device, dtype)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # The producers' rows join the batch here, after the callbacks' own batch-start hooks: each
        # producer reads the batch as the loaders gave it, and `add_rows` merges what they add.
        trainer = self.trainer
        step = StepContext(trainer.global_step, batch_idx, trainer.accumulate_grad_batches,
                           trainer.global_rank, trainer.world_size)
        produced = [p.rows(batch, step, self) for p in self.producers]
        add_rows(batch, produced, pad_token_id(self.tokenizer), self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        self._require_streams(batch.keys(), "the batch has")
        terms = [r for r in self.regularizers if r.adds_term]
        trained = ({TASK} if self.task_loss is not None else set()).union(*(r.streams for r in terms))
        outputs = {s: self.logits(batch[s]["input_ids"], batch[s]["attention_mask"]) for s in trained}
        if TASK not in outputs:  # no task loss: the task NLL is only logged
            with torch.no_grad():
                outputs[TASK] = self.logits(batch[TASK]["input_ids"], batch[TASK]["attention_mask"])
        logs, loss = task_terms(self.task_loss, outputs[TASK], batch[TASK]["labels"], self.hparams.normalize)
        sources = dict.fromkeys(logs, (TASK,))
        loss = 0.0 if loss is None else loss
        for reg in terms:
            term = reg(batch, outputs)
            logs[f"train/reg/{reg.name}"], sources[f"train/reg/{reg.name}"] = term, reg.streams
            loss = loss + reg.weight * term
        if self.nonfinite.skips(self, logs, sources, batch_idx):
            return None
        batch_size = batch[TASK]["input_ids"].size(0)
        self.log_dict(logs, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for reg in self.regularizers:
            reg.on_after_optimizer_step(self)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The weights to evaluate with (an EMA's average when it asks for it), restored after."""
        with contextlib.ExitStack() as stack:
            for reg in self.regularizers:
                stack.enter_context(reg.eval_weights(self))
            yield

    def on_validation_epoch_start(self) -> None:
        self._eval_stack = contextlib.ExitStack()
        self._eval_stack.enter_context(self.evaluation_weights())

    def on_validation_epoch_end(self) -> None:
        self._eval_stack.close()

    def on_train_end(self) -> None:
        for reg in self.regularizers:
            reg.on_train_end(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["regularizers"] = checkpoint_states(self.regularizers)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":  # it matters only to a resumed fit
            restore_states(self.regularizers, checkpoint.get("regularizers", {}))

    def save_pretrained(self, out: str | Path | None) -> None:
        """Write the model and tokenizer as a Hugging Face checkpoint (LoRA: merged + `adapter/`).

        A sharded model is gathered into one CPU copy on rank 0 first: every rank must call this;
        rank 0 writes `out`, the others pass None.
        """
        model = self.model
        if is_sharded(model):
            fsdp1 = self.device_mesh is None  # FSDP1 wraps the LightningModule: read it from the root
            model = gathered_copy(model, self.hf_model.config, self.lora,
                                  root=self.trainer.strategy.model if fsdp1 else None,
                                  prefix="model." if fsdp1 else "")
        if out is not None:
            save_hf(model, self.tokenizer, out)

    def _evaluate(self, batch: dict, stage: str) -> None:
        ((stream, rows),) = batch.items()  # one stream per validation loader
        logits = self.logits(rows["input_ids"], rows["attention_mask"])
        for key, metric in self.evaluation.update(stage, stream, logits, rows, self.reference).items():
            self.log(key, metric, add_dataloader_idx=False)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

