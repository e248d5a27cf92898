"""The regularizer interface: a weighted scalar term added to the task loss."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..losses import Normalization


def _snake_case(name: str) -> str:
    """`NLLReplay` -> `nll_replay`, `KLToReference` -> `kl_to_reference`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2) parameter; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def gather_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole CPU tensor whose shard `local` is, sharded as `param` is (all ranks call it)."""
    if isinstance(param, DTensor):
        local = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride()).full_tensor()
    return local.detach().cpu()


def shard_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `whole`, cut as `param` is (no communication)."""
    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


class Regularizer:
    """One term of the fine-tuning objective: loss = task_loss + sum_i weight_i * term_i.

    Lifecycle, split from the math:
      - `setup(module)` runs once per fit, after the model is built (and sharded) and before a
        checkpoint is restored; snapshot what the term needs here (theta_0, a handle on the frozen
        reference model, ...).
      - `__call__(batch, outputs)` returns the scalar term for one step. `batch` maps stream
        names ("task", "replay") to padded batches; `outputs` maps each stream listed in
        `streams` to the trainable model's `losses.Logits` on it (its final hidden states and
        output head), computed once per step and shared by all regularizers. Form a term with
        `losses.chunked_target_mean(per_token, labels, outputs[stream], ...)`: `per_token` sees
        (N, V) logits of a chunk of target tokens, so the (B, T, V) logits never exist;
        `outputs[stream].full()` forms them whole, for small vocabularies only.
      - `on_after_optimizer_step(module)` runs after every optimizer step (weight averaging).
      - `eval_weights(module)` is a context manager that validation and the retained-task
        evaluation run inside (weight averaging swaps its average in there).
      - `on_train_end(module)` runs once when training ends, before the model is exported.
      - `state_dict()` / `load_state_dict(state)`: state saved in and restored from checkpoints.

    Subclasses set `streams` to the batch streams whose logits they read (and `reads` when they
    also read a stream without its logits, as `SelfDistillation` reads the teacher's view; a
    stream that the data or a callback adds and no term reads is refused at fit start),
    `needs_reference` when they read the module's frozen reference model, `adds_term = False`
    when they add nothing to the loss (weight averaging), and `per_parameter_state` when they
    keep a tensor per parameter.
    """

    streams: tuple[str, ...] = ()
    needs_reference: bool = False
    adds_term: bool = True
    per_parameter_state: bool = False
    """Keeps a tensor per trainable parameter (theta_0, an average): per-shard under FSDP2, not
    supported by FSDP1's flattened shards."""
    normalize: Normalization = "token"
    """What a term summed over target positions is divided by (`losses.normalizer`): `token` or
    `sequence`. The module sets it from its own `normalize` before `setup`, so that every term
    and the task loss are normalized alike."""

    @property
    def reads(self) -> tuple[str, ...]:
        """Every batch stream the term reads: by default the streams whose logits it takes."""
        return self.streams

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            name: Log key suffix (`train/reg/<name>`); default: the class name in snake_case.
        """
        if weight < 0:
            raise ValueError(f"{type(self).__name__}.weight must be >= 0, got {weight}")
        self.weight = weight
        self.name = name or _snake_case(type(self).__name__)

    def setup(self, module: L.LightningModule) -> None:
        """Called once per fit with the LightningModule (`CausalLMFineTuner`: its `model`,
        `hf_model`, `reference` and `tokenizer`), before any checkpoint is restored."""

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def on_after_optimizer_step(self, module: L.LightningModule) -> None:
        """Called after every optimizer step."""

    @contextlib.contextmanager
    def eval_weights(self, module: L.LightningModule) -> Iterator[None]:
        """Weights to evaluate with; by default the live ones."""
        yield

    def on_train_end(self, module: L.LightningModule) -> None:
        """Called once when training ends, before the Hugging Face export."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (empty: nothing to restore)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, name={self.name!r})"
