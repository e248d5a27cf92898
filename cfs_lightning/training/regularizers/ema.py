"""Exponential moving average of the trainable weights (weight averaging, no loss term)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ..sharding import gather_like, local_shard, reshard, shard_like
from .base import Regularizer


class EMA(Regularizer):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, every `update_every` optimizer steps.

    The average is kept per shard: under FSDP2 each rank averages only its own shards of the
    (DTensor) parameters, so nothing is gathered and the memory cost is one copy (in at least
    float32) of this rank's trainable shards. It adds no term to the loss (`adds_term = False`); it is a
    regularizer because it reads the trainable weights at fixed points of the training loop.

    - `eval_with_ema`: validation and `RetainedEval` see the averaged weights; the live ones are
      backed up meanwhile (one more copy of the trainable shards) and restored bit for bit.
    - `final`: `ema` writes the average into the model when training ends, so the exported and
      last-saved weights are the average; `live` keeps the trained weights.
    - The average is saved in checkpoints and restored on resume. Sharded averages are gathered
      whole for the checkpoint (one parameter at a time, to CPU) and cut back to each rank's shard
      on resume, so a checkpoint written on N processes resumes on any number.
    """

    adds_term = False
    per_parameter_state = True

    def __init__(self, decay: float = 0.999, update_every: int = 1, eval_with_ema: bool = True,
                 final: Literal["ema", "live"] = "ema", name: str | None = None) -> None:
        """
        Args:
            decay: Weight of the old average per update, in [0, 1).
            update_every: Optimizer steps between updates.
            eval_with_ema: Validate and run retained-task evaluations on the averaged weights.
            final: `ema`: training ends with the averaged weights in the model; `live`: the trained ones.
            name: State key in checkpoints; default `ema`.
        """
        super().__init__(1.0, name)
        if not 0 <= decay < 1:
            raise ValueError(f"EMA.decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA.update_every must be >= 1, got {update_every}")
        if final not in ("ema", "live"):
            raise ValueError(f"EMA.final must be 'ema' or 'live', got {final!r}")
        self.decay, self.update_every = decay, update_every
        self.eval_with_ema, self.final = eval_with_ema, final
        self.params: list[torch.nn.Parameter] = []
        self.average: list[torch.Tensor] = []
        self.num_updates = 0
        self._steps = 0

    def setup(self, module) -> None:
        self.params = [p for p in module.model.parameters() if p.requires_grad]
        # At least float32: bf16 cannot hold (1 - decay)-sized increments.
        self.average = [local_shard(p.detach()).to(torch.promote_types(p.dtype, torch.float32), copy=True)
                        for p in self.params]
        self.num_updates, self._steps = 0, 0

    @torch.no_grad()
    def on_after_optimizer_step(self, module) -> None:
        self._steps += 1
        if self._steps % self.update_every or not self.params:
            return
        live = [local_shard(p.detach()) for p in self.params]
        if self.average and self.average[0].device != live[0].device:  # the model was placed after setup
            self.average = [a.to(p.device) for a, p in zip(self.average, live, strict=True)]
        live = [p if p.dtype == a.dtype else p.to(a.dtype) for p, a in zip(live, self.average, strict=True)]
        torch._foreach_lerp_(self.average, live, 1 - self.decay)  # one fused update for all tensors
        self.num_updates += 1

    @torch.no_grad()
    def _load_average(self, module) -> None:
        reshard(module.model)  # no stale gathered copy may outlive the swap (FSDP2)
        for i, p in enumerate(self.params):
            live = local_shard(p.detach())
            live.copy_(self.average[i].to(live.device))

    @contextlib.contextmanager
    def eval_weights(self, module) -> Iterator[None]:
        """The averaged weights in the model; the live ones are backed up and restored exactly."""
        if not (self.eval_with_ema and self.params):
            yield
            return
        with torch.no_grad():
            backup = [local_shard(p.detach()).clone() for p in self.params]
            self._load_average(module)
        try:
            yield
        finally:
            reshard(module.model)
            with torch.no_grad():
                for p, kept in zip(self.params, backup, strict=True):
                    local_shard(p.detach()).copy_(kept)

    def on_train_end(self, module) -> None:
        if self.final == "ema" and self.params:
            self._load_average(module)

    def state_dict(self) -> dict[str, Any]:
        average = [gather_like(a, p) for a, p in zip(self.average, self.params, strict=True)]
        return {"average": average, "num_updates": self.num_updates, "steps": self._steps,
                "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.params):
            raise ValueError(
                f"{self.name}: the checkpoint averages {len(state['average'])} tensors but the model "
                f"has {len(self.params)} trainable ones; it was saved for another model or LoRA setup"
            )
        self.average = [shard_like(saved, p).to(a.device, a.dtype)
                        for saved, a, p in zip(state["average"], self.average, self.params, strict=True)]
        self.num_updates, self._steps = state["num_updates"], state["steps"]
