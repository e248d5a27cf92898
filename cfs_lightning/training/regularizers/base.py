"""The regularizer interface: a weighted scalar term added to the task loss."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from ..losses import Normalization


def _snake_case(name: str) -> str:
    """`NLLReplay` -> `nll_replay`, `KLToReference` -> `kl_to_reference`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Regularizer:
    """One term of the fine-tuning objective: loss = task_loss + sum_i weight_i * term_i.

    Lifecycle, split from the math:
      - `check_base(model)` runs when a fit sets up, on the whole transformers model before it is
        sharded or a checkpoint restored: refuse there what does not fit the base model.
      - `setup(module)` runs once per fit, after the model is built (and sharded) and before a
        checkpoint is restored; snapshot what the term needs here (theta_0, a handle on the frozen
        reference model, ...).
      - `__call__(batch, outputs)` returns the scalar term for one step. `batch` maps stream
        names (`cfs_lightning.streams`: `TASK`, `REPLAY`, ...) to padded batches; `outputs` maps
        each stream listed in `streams` to the trainable model's `heads.Logits` on it (its final
        hidden states and output head), computed once per step and shared by all regularizers.
        Form a term with `losses.chunked_target_mean(per_token, labels, outputs[stream], ...)`:
        `per_token` sees (N, V) logits of a chunk of target tokens, so the (B, T, V) logits never
        exist; `outputs[stream].full()` forms them whole, for small vocabularies only.
      - `on_after_optimizer_step(module)` runs after every optimizer step (weight averaging).
      - `eval_weights(module)` is a context manager that validation and the retained-task
        evaluation run inside (weight averaging swaps its average in there).
      - `on_train_end(module)` runs once when training ends, before the model is exported.
      - `state_dict()` / `load_state_dict(state)`: state saved in and restored from checkpoints.

    Subclasses declare what they read, which the module checks against what the stream
    producers declare (`cfs_lightning.streams.StreamProducer`) when the fit starts: `streams`,
    the batch streams whose logits they read; `reads`, when they also read a stream without its
    logits (as `SelfDistillation` reads the teacher's view; a stream that a producer adds and no
    term reads is refused); `needs_columns`, the columns beyond `input_ids`, `attention_mask` and
    `labels` they read per stream (a producer whose rows lack them is refused). They also set
    `needs_reference` when they read the module's frozen reference model, `adds_term = False`
    when they add nothing to the loss (weight averaging), and `per_parameter_state` when they
    keep a tensor per parameter.
    """

    streams: tuple[str, ...] = ()
    needs_columns: dict[str, tuple[str, ...]] = {}
    """Stream -> the extra columns the term reads on it (e.g. `{REPLAY: CACHED_TOPK}`)."""
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

    def check_base(self, model: torch.nn.Module) -> None:
        """Called when a fit sets up, with the unsharded transformers model at its base weights."""

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


def checkpoint_states(regularizers: list[Regularizer]) -> dict[str, dict[str, Any]]:
    """Each stateful regularizer's `state_dict()`, by name, for a checkpoint."""
    states = {r.name: r.state_dict() for r in regularizers}
    return {name: state for name, state in states.items() if state}


def restore_states(regularizers: list[Regularizer], saved: dict[str, dict[str, Any]]) -> None:
    """Load each regularizer's state from a checkpoint's `checkpoint_states`; refuse a checkpoint
    without the state of a regularizer that keeps one."""
    for reg in regularizers:
        if reg.name in saved:
            reg.load_state_dict(saved[reg.name])
        elif type(reg).state_dict is not Regularizer.state_dict:
            raise KeyError(
                f"regularizer {reg.name!r} keeps state, but the checkpoint has none for it "
                f"(it holds {sorted(saved) or 'none'}); resume with the regularizers it was "
                "saved with, or start a new fit from its exported weights"
            )
