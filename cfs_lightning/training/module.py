"""The LightningModule: a causal LM fine-tuned on its task loss plus a list of regularizers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftModel
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FullyShardedDataParallel
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from ..loading import load_causal_lm, load_tokenizer
from ..shards import check_model
from ..tokens import eval_mode
from .lora import LoRA, apply_lora, save_merged, unwrap
from .heads import OutputHead, reproduces_logits, split_logits, splits_head
from .losses import NORMALIZATIONS, Logits, dft, mean_token_loss, token_nll
from .meter import forgetting_kl, meter_source
from .reference import FrozenReference, resolve_reference_mode
from .regularizers import NLLReplay, Regularizer
from .sharding import gathered_copy, is_sharded, shard_fsdp2

TASK_LOSSES = ("nll", "dft", "none")
"""Task losses `task_loss` selects: the response-masked NLL, or DFT's probability-weighted NLL."""

VAL_KEYS = {"task": "task_loss", "replay": "replay_nll"}
"""Validation log key per stream: `val/task_loss` and `val/replay_nll` (nats per token)."""

METER_KEYS = {"task": "task_kl", "replay": "replay_kl"}
"""The forgetting meter's key per stream: `val/task_kl`, `val/replay_kl` (KL(p_base || p_theta),
nats per token; `meter.py`)."""

READERS = {
    "replay": "add NLLReplay, KLToReference (on: replay) or KLFromCachedTopK, or set data.replay_ratio "
              "to 0 (the held-out replay is still validated)",
    "onpolicy": "add KLToReference (on: onpolicy) or SelfDistillation, or remove the callback",
    "onpolicy_teacher": "add SelfDistillation, which reads the teacher's view, or set "
                        "OnlineReplay.demonstrations to false",
}
"""What reads each stream, for the error that refuses a stream nothing reads."""

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss term went NaN or infinite; the message names the step, the term and the stream."""


class CausalLMFineTuner(L.LightningModule):
    """Fine-tunes any Hugging Face causal LM on `task_loss + sum_i weight_i * regularizer_i`.

    Every training batch is a dict of streams (`task`, and `replay` when the DataModule mixes it
    in). The task loss is the response-masked NLL (`task_loss: nll`) or DFT's weighting of it
    (`task_loss: dft`); `train/task_loss` is always the plain NLL, so that runs compare, and the
    DFT objective is logged as `train/task_dft`. Each regularizer's term is logged under
    `train/reg/<name>`, their weighted sum with the task loss under `train/loss`.

    Validation logs `val/task_loss` and `val/replay_nll`, and, when there is a frozen reference
    or cached top-k, the forgetting meter `val/task_kl` and `val/replay_kl` (`meter.py`).

    The module owns the frozen reference model when a regularizer needs one (`reference`), and
    optionally trains LoRA adapters instead of all weights (`lora`).

    The losses read each stream as `losses.Logits` (`logits`): the final hidden states and the
    output head, applied a chunk of target tokens at a time, so no (B, T, V) tensor is formed
    (`head_split`, checked at construction against the model's own logits).
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
        task_loss: Literal["nll", "dft", "none"] = "nll",
        normalize: Literal["token", "sequence"] = "token",
        activation_checkpointing: bool = False,
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
            reference: The frozen reference for regularizers that need one (`KLToReference`):
                `copy` (a frozen copy of the initial weights), `adapters_disabled` (with LoRA: the
                same weights, adapters off, no second copy), `none`, or `auto`: none unless a
                regularizer needs it, then `adapters_disabled` with LoRA and `copy` without.
                With a reference, every validation also logs the forgetting meter
                (`val/replay_kl`, `val/task_kl`: `meter.py`); set `copy` on a run without KL
                terms (plain fine-tuning) to measure it there.
            lora: Train low-rank adapters (peft) instead of all weights; the export then holds
                the merged model and, under `adapter/`, the adapter alone.
            nonfinite: What a NaN or infinite loss term does: `stop` saves `last.ckpt` (the
                weights before the step) and raises an error naming the step, the term and its
                stream; `skip` drops the batch (no update) and counts it in
                `train/skipped_nonfinite`.
            task_loss: The loss on the task's response tokens: `nll` (mean NLL) or `dft`
                (Dynamic Fine-Tuning, arXiv 2508.05629: each token's NLL times its detached
                probability). ASFT (arXiv 2509.23753) is `dft` plus
                `KLToReference(on: task)`: configs/toy/methods/asft.yaml. `none`: the task
                batch is only a source of prompts and the regularizers are the whole loss
                (SDFT, `SelfDistillation`: configs/toy/methods/sdft.yaml); `train/task_loss` is
                still logged, computed without a gradient.
            normalize: What the task loss and every regularizer's term, each a sum over its
                stream's target positions, are divided by: `token`, the number of target tokens
                (nats per token, each stream averaged on its own), or `sequence`, the number of
                sequences (each sequence's summed loss averaged over sequences: the CFS
                objective E_F[-log p(y|x)] + lambda E_x[-log p(x)] of arXiv 2505.13811, as
                configs/paper/ uses). A replay weight under `token` equals one under `sequence`
                times (mean replay length / mean response length), in tokens. `train/*` keys
                are in the chosen unit; validation stays per token. See docs/methods.md.
            activation_checkpointing: Keep only each decoder block's input in the forward pass
                and recompute the block in the backward pass (transformers' gradient
                checkpointing, non-reentrant): the activations' memory shrinks to about one
                (B, T, H) tensor per block, for about a third more compute. Under FSDP1 use the
                strategy's `activation_checkpointing_blocks` instead.
        """
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if task_loss not in TASK_LOSSES:
            raise ValueError(f"model.task_loss must be one of {TASK_LOSSES}, got {task_loss!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"model.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if task_loss == "none" and not any(r.adds_term for r in regularizers or []):
            raise ValueError("model.task_loss=none leaves no loss without a regularizer that adds a term "
                             "(e.g. SelfDistillation); add one, or use task_loss nll or dft")
        self.save_hyperparameters(ignore=["regularizers", "optimizer", "lr_scheduler"])
        self.regularizers = list(regularizers or [])
        names = [r.name for r in self.regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique, got {names}; set `name` on each")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        # from_pretrained returns eval mode; Lightning keeps modules' modes as given
        model = load_causal_lm(pretrained, dtype, trust_remote_code).train()
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mode = resolve_reference_mode(reference, any(r.needs_reference for r in self.regularizers),
                                      lora is not None)
        # A plain attribute, not a submodule: never in the optimizer, state_dict or checkpoints.
        self.reference: FrozenReference | None = FrozenReference(model, "copy") if mode == "copy" else None
        self.lora = lora
        self.model = apply_lora(model, lora) if lora is not None else model
        if mode == "adapters_disabled":
            self.reference = FrozenReference(self.model, mode)
        self.tokenizer = load_tokenizer(tokenizer or pretrained, trust_remote_code)
        self.head_split = self._head_splits()
        self.nonfinite, self.skipped_nonfinite = nonfinite, 0
        self.val_nll = nn.ModuleDict({s: MeanMetric() for s in VAL_KEYS})
        self.test_nll = nn.ModuleDict({s: MeanMetric() for s in VAL_KEYS})
        self.val_kl = nn.ModuleDict({s: MeanMetric() for s in METER_KEYS})
        self.test_kl = nn.ModuleDict({s: MeanMetric() for s in METER_KEYS})
        self._meter_said: set[str] = set()  # what the meter reads, said once per stream

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Logits:
        """The next-token logits of a batch as the losses read them: (B, T, H) final hidden
        states and the output head (`heads.split_logits`), so that no (B, T, V) tensor is formed;
        the (B, T, V) logits themselves where the head does not split off (`splits_head`)."""
        if self.head_split and not isinstance(self.model, FullyShardedDataParallel):
            return split_logits(self.model, self.hf_model, input_ids, attention_mask)
        return Logits(self(input_ids, attention_mask))

    def _head_splits(self) -> bool:
        """Whether the losses can run the output head themselves: the model's forward can skip its
        head and the split reproduces its logits (soft-capping included). Where not (a model
        without `logits_to_keep`, a post-processing step cfs_lightning does not know), the
        (B, T, V) logits are formed, and the losses still run a chunk of them at a time."""
        hf = self.hf_model
        if not splits_head(hf):
            log.info("%s takes no logits_to_keep: training forms its (B, T, V) logits", type(hf).__name__)
            return False
        with eval_mode(self.model):
            if reproduces_logits(hf, lambda ids, mask: split_logits(self.model, hf, ids, mask).hidden, OutputHead(hf)):
                return True
        log.info("%s post-processes its logits in a way cfs_lightning does not know: training forms "
                 "its (B, T, V) logits", type(hf).__name__)
        return False

    def _logits(self, batch: dict, streams: set[str]) -> dict[str, Logits]:
        missing = streams - batch.keys()
        if missing:
            users = [r.name for r in self.regularizers if set(r.streams) & missing]
            fix = ("add the callback that samples it, OnlineReplay(sampler: trainable, prompts: task, "
                   "stream: onpolicy)" if "onpolicy" in missing else
                   "give the DataModule replay shards (data.replay.dir) and data.replay_ratio > 0")
            raise KeyError(
                f"regularizers {users} need the {sorted(missing)} stream, but the batch has only "
                f"{sorted(batch)}: {fix}"
            )
        return {s: self.logits(batch[s]["input_ids"], batch[s]["attention_mask"]) for s in streams}

    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model being trained (LoRA layers included when `lora` is set)."""
        model = self.model.module if isinstance(self.model, FullyShardedDataParallel) else self.model
        return unwrap(model)

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Shards sampled from a base model must come from this one. Checked before fitting, while
        # the weights are still the base's (a checkpoint is restored later); the DataModule, which
        # read them, lists them in `shard_manifests` (a DataModule that reads none has none).
        if stage != "fit":
            return
        listed = getattr(self.trainer.datamodule, "shard_manifests", {})
        for where, (manifest, waiver) in listed.items():
            check_model(manifest, self.hf_model, where, waiver)
        self._check_streams_are_read()
        # A callback that samples from the frozen reference (`OnlineReplay`) declares
        # `needs_reference`; the reference is then built here, from the initial weights.
        if self.reference is None and any(getattr(cb, "needs_reference", False) for cb in self.trainer.callbacks):
            mode = resolve_reference_mode(self.hparams.reference, True, self.lora is not None)
            self.reference = FrozenReference(self.model, mode)

    def _check_streams_are_read(self) -> None:
        """Refuse a stream that the data or a callback adds to every training batch and no loss
        term reads: it would be built (sampled, loaded, moved) and discarded every step."""
        producers = {s: f"data.replay_ratio={self.trainer.datamodule.replay_ratio}"
                     for s in getattr(self.trainer.datamodule, "train_streams", ()) if s != "task"}
        for cb in self.trainer.callbacks:
            for s in getattr(cb, "streams", ()):
                producers.setdefault(s, f"the {type(cb).__name__} callback (stream: {s})")
        read = {s for r in self.regularizers if r.adds_term for s in r.reads}
        for stream, producer in producers.items():
            if stream not in read:
                terms = [r.name for r in self.regularizers] or "none"
                raise ValueError(
                    f"{producer} adds a `{stream}` stream to every training batch, but no regularizer "
                    f"reads it (regularizers: {terms}); {READERS.get(stream, 'add a regularizer that reads it')}"
                )

    def configure_model(self) -> None:
        # FSDP2 (ModelParallelStrategy) hands us a device mesh: shard per decoder block here,
        # the frozen reference in units of its own. Later stages find the model already sharded.
        if self.device_mesh is not None and not is_sharded(self.model):
            mesh = self._data_parallel_mesh()
            shard_fsdp2(self.hf_model, mesh)  # the transformers model is the root unit, also under LoRA
            if self.reference is not None:
                self.reference.shard(mesh)
        # Regularizers snapshot theta_0 / averages here: after the model exists in its final
        # (possibly sharded) form and before a checkpoint is restored over it.
        if self._trainer is not None and self.trainer.state.fn == "fit":
            for reg in self.regularizers:
                reg.normalize = self.hparams.normalize  # every term normalized as the task loss is
                reg.setup(self)

    def _data_parallel_mesh(self) -> DeviceMesh:
        mesh = self.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "cfs_lightning shards with FSDP2 only (no tensor parallelism): set the strategy's "
                "tensor_parallel_size=1 and data_parallel_size to the number of devices "
                "(configs/strategies/fsdp2.yaml)"
            )
        return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh

    def on_fit_start(self) -> None:
        # A `trainer.validate` before the fit left the metrics' states as inference tensors,
        # which the fit's validation (no_grad, not inference mode) cannot update in place.
        for metric in (*self.val_nll.values(), *self.val_kl.values()):
            metric.reset()
        if self.reference is not None:
            dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
            self.reference.to(self.device, dtype)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        terms = [r for r in self.regularizers if r.adds_term]
        trained = self.hparams.task_loss != "none"
        outputs = self._logits(batch, ({"task"} if trained else set()).union(*(r.streams for r in terms)))
        if "task" not in outputs:  # task_loss none: the task NLL is only logged
            with torch.no_grad():
                outputs["task"] = self._logits(batch, {"task"})["task"]
        per, labels = self.hparams.normalize, batch["task"]["labels"]
        sources = {"train/task_loss": ("task",)}
        # The NLL is logged whatever the objective, so that runs compare; only `nll` trains on it.
        with contextlib.nullcontext() if self.hparams.task_loss == "nll" else torch.no_grad():
            logs = {"train/task_loss": mean_token_loss(outputs["task"], labels, per)}
        if self.hparams.task_loss == "dft":
            logs["train/task_dft"], sources["train/task_dft"] = mean_token_loss(outputs["task"], labels, per, dft), ("task",)
        loss = (logs["train/task_dft"] if self.hparams.task_loss == "dft" else
                logs["train/task_loss"] if trained else 0.0)
        for reg in terms:
            term = reg(batch, outputs)
            logs[f"train/reg/{reg.name}"], sources[f"train/reg/{reg.name}"] = term, reg.streams
            loss = loss + reg.weight * term
        if self._nonfinite(logs, sources, batch_idx):
            return None
        batch_size = batch["task"]["input_ids"].size(0)
        self.log_dict(logs, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _nonfinite(self, logs: dict[str, torch.Tensor], sources: dict[str, tuple], batch_idx: int) -> bool:
        """Whether this step is skipped for a NaN/Inf term (on any rank); `stop` raises instead."""
        bad = [key for key, value in logs.items() if not torch.isfinite(value.detach()).all()]
        if not self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return False
        if self.nonfinite == "skip":
            self.skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), reduce_fx="max")
            return True
        path = self._save_last_checkpoint()
        what = (", ".join(f"{k} is {logs[k].item()} on the {'/'.join(sources[k]) or 'no'} stream" for k in bad)
                if bad else "a term is non-finite on another rank")
        raise NonFiniteLossError(
            f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}): {what}. The "
            f"weights before this step are saved in {path}; resume with --ckpt_path={path}, or set "
            "model.nonfinite=skip to skip such batches (or lower the learning rate)"
        )

    def _save_last_checkpoint(self) -> Path:
        """`last.ckpt` next to the run's checkpoints (every rank calls this)."""
        callback = self.trainer.checkpoint_callback
        folder = (Path(callback.dirpath) if callback is not None and callback.dirpath
                  else Path(self.trainer.default_root_dir) / "checkpoints")
        path = folder / "last.ckpt"
        self.trainer.save_checkpoint(path)
        return path

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
        states = {r.name: r.state_dict() for r in self.regularizers}
        checkpoint["regularizers"] = {k: v for k, v in states.items() if v}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit":
            return  # regularizer state matters only to a resumed fit
        saved = checkpoint.get("regularizers", {})
        for reg in self.regularizers:
            if reg.name in saved:
                reg.load_state_dict(saved[reg.name])
            elif type(reg).state_dict is not Regularizer.state_dict:
                raise KeyError(
                    f"regularizer {reg.name!r} keeps state, but the checkpoint has none for it "
                    f"(it holds {sorted(saved) or 'none'}); resume with the regularizers it was "
                    "saved with, or start a new fit from its exported weights"
                )

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
        if out is None:
            return
        if isinstance(model, PeftModel):
            save_merged(model, out)
        else:
            model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    def _eval_step(self, batch: dict, nll: nn.ModuleDict, kl: nn.ModuleDict, prefix: str) -> None:
        ((stream, b),) = batch.items()
        logits = self.logits(b["input_ids"], b["attention_mask"])
        total, count = token_nll(logits, b["labels"])
        nll[stream].update(total / count, weight=count)  # token-weighted over the epoch
        self.log(f"{prefix}/{VAL_KEYS[stream]}", nll[stream], add_dataloader_idx=False)
        self._say_meter_source(stream, b)
        divergence = forgetting_kl(logits, b, self.reference)
        if divergence is not None:
            kl[stream].update(divergence, weight=count)
            self.log(f"{prefix}/{METER_KEYS[stream]}", kl[stream], add_dataloader_idx=False)

    def _say_meter_source(self, stream: str, batch: dict) -> None:
        """Log once per stream what the forgetting meter reads, or why it is off."""
        if stream in self._meter_said:
            return
        self._meter_said.add(stream)
        key, source = f"val/{METER_KEYS[stream]}", meter_source(self.reference, batch)
        if source == "reference":
            log.info("%s: exact KL(p_base || p_theta) to the frozen reference, full vocabulary", key)
        elif source == "topk":
            log.info("%s: KL(p_base || p_theta) coarsened to the replay shards' cached top-%d tokens "
                     "plus one tail bucket (a lower bound of the exact KL)", key, batch["topk_ids"].size(-1))
        else:
            log.info("%s is off: no frozen reference%s; set model.reference=copy to measure it", key,
                     " and no cached top-k in the replay shards" if stream == "replay" else "")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_nll, self.val_kl, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_nll, self.test_kl, "test")

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
