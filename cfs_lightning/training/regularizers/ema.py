"""Exponential moving average of the trainable weights, optionally bias-corrected (BEMA); weight
averaging, no loss term."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ..sharding import gather_like, local_shard, reshard, shard_like
from .base import Regularizer


class EMA(Regularizer):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, every `update_every` optimizer steps.

    BEMA (bias-corrected EMA, arXiv 2508.00180; TRL's `BEMACallback`) is this average with two
    options. `ema_power` (kappa) replaces the constant decay by 1 - beta_t with
    beta_t = max((lag + multiplier * t) ** -kappa, min_ema_multiplier), t the optimizer step;
    `bias_power` (eta) evaluates and exports theta_ema + alpha_t * (theta - theta_0) instead of
    theta_ema, with alpha_t = (lag + multiplier * t) ** -eta at the last update and theta_0 the
    weights at the start (or at step `update_after`, when the average also restarts from the live
    weights; updates follow every `update_every` steps after it). The schedules are TRL's. The
    correction uses the live weights when it is applied; with `update_every = 1` these are the
    weights of the last update, as in TRL.

    The average is kept per shard: under FSDP2 each rank averages only its own shards of the
    (DTensor) parameters, so nothing is gathered and the memory cost is one copy (in at least
    float32) of this rank's trainable shards, two with `bias_power` (theta_0). It adds no term to
    the loss (`adds_term = False`); it is a regularizer because it reads the trainable weights at
    fixed points of the training loop.

    - `eval_with_ema`: validation and `RetainedEval` see the averaged weights; the live ones are
      backed up meanwhile (one more copy of the trainable shards) and restored bit for bit.
    - `final`: `ema` writes the average into the model when training ends, so the exported and
      last-saved weights are the average; `live` keeps the trained weights.
    - The average (and theta_0) is saved in checkpoints and restored on resume. Sharded tensors
      are gathered whole for the checkpoint (one parameter at a time, to CPU) and cut back to each
      rank's shard on resume, so a checkpoint written on N processes resumes on any number.
    """

    adds_term = False
    per_parameter_state = True

    def __init__(self, decay: float = 0.999, update_every: int = 1, eval_with_ema: bool = True,
                 final: Literal["ema", "live"] = "ema", ema_power: float | None = None,
                 bias_power: float | None = None, lag: float = 10.0, multiplier: float = 1.0,
                 min_ema_multiplier: float = 0.0, update_after: int = 0, name: str | None = None) -> None:
        """
        Args:
            decay: Weight of the old average per update, in [0, 1); unused with `ema_power`.
            update_every: Optimizer steps between updates (TRL's `update_freq`, phi).
            eval_with_ema: Validate and run retained-task evaluations on the averaged weights.
            final: `ema`: training ends with the averaged weights in the model; `live`: the trained ones.
            ema_power: BEMA's kappa: the decay follows 1 - (lag + multiplier * t) ** -kappa
                (TRL's 0.5); None: the constant `decay`.
            bias_power: BEMA's eta: add (lag + multiplier * t) ** -eta * (theta - theta_0) to the
                average where it is used (0.2 in TRL); None: no correction.
            lag: BEMA's rho, the schedules' virtual starting age (TRL's 10).
            multiplier: BEMA's gamma, the schedules' steps per unit of age.
            min_ema_multiplier: Floor of the scheduled 1 - decay.
            update_after: BEMA's tau: steps before theta_0 and the average are taken; none before.
            name: State key in checkpoints; default `ema`.
        """
        super().__init__(1.0, name)
        if not 0 <= decay < 1:
            raise ValueError(f"EMA.decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA.update_every must be >= 1, got {update_every}")
        if final not in ("ema", "live"):
            raise ValueError(f"EMA.final must be 'ema' or 'live', got {final!r}")
        for field, value in (("ema_power", ema_power), ("bias_power", bias_power), ("lag", lag),
                             ("update_after", update_after)):
            if value is not None and value < 0:
                raise ValueError(f"EMA.{field} must be >= 0, got {value}")
        if multiplier <= 0 or not 0 <= min_ema_multiplier <= 1:
            raise ValueError(f"EMA.multiplier must be > 0 and min_ema_multiplier in [0, 1], got "
                             f"{multiplier} and {min_ema_multiplier}")
        self.decay, self.update_every = decay, update_every
        self.eval_with_ema, self.final = eval_with_ema, final
        self.ema_power, self.bias_power, self.lag, self.multiplier = ema_power, bias_power, lag, multiplier
        self.min_ema_multiplier, self.update_after = min_ema_multiplier, update_after
        self.params: list[torch.nn.Parameter] = []
        self.average: list[torch.Tensor] = []
        self.theta0: list[torch.Tensor] = []
        self.alpha = 0.0
        self.num_updates = 0
        self._steps = 0

    def setup(self, module) -> None:
        self.params = [p for p in module.model.parameters() if p.requires_grad]
        # At least float32: bf16 cannot hold (1 - decay)-sized increments.
        self.average = [local_shard(p.detach()).to(torch.promote_types(p.dtype, torch.float32), copy=True)
                        for p in self.params]
        self.theta0 = [a.clone() for a in self.average] if self.bias_power is not None else []
        self.alpha, self.num_updates, self._steps = 0.0, 0, 0

    def _age(self, t: int) -> float:
        return self.lag + self.multiplier * t

    def decay_at(self, t: int) -> float:
        """The decay of the update at optimizer step t."""
        if self.ema_power is None:
            return self.decay
        return 1 - max(self._age(t) ** -self.ema_power, self.min_ema_multiplier)

    @torch.no_grad()
    def on_after_optimizer_step(self, module) -> None:
        self._steps += 1
        t = self._steps - self.update_after
        if t < 0 or (t and t % self.update_every) or not self.params:
            return
        live = [local_shard(p.detach()) for p in self.params]
        if self.average[0].device != live[0].device:  # the model was placed after setup
            self.average = [a.to(p.device) for a, p in zip(self.average, live, strict=True)]
            if self.theta0:
                self.theta0 = [a.to(p.device) for a, p in zip(self.theta0, live, strict=True)]
        live = [p if p.dtype == a.dtype else p.to(a.dtype) for p, a in zip(live, self.average, strict=True)]
        if t == 0:  # the burn-in ends: theta_0 and the average start here
            torch._foreach_copy_(self.average, live)
            if self.theta0:
                torch._foreach_copy_(self.theta0, live)
            return
        torch._foreach_lerp_(self.average, live, 1 - self.decay_at(self._steps))  # one fused update
        if self.bias_power is not None:
            self.alpha = self._age(self._steps) ** -self.bias_power
        self.num_updates += 1

    @torch.no_grad()
    def _load_average(self, module) -> None:
        """The average (with BEMA's correction) into the model."""
        reshard(module.model)  # no stale gathered copy may outlive the swap (FSDP2)
        for i, p in enumerate(self.params):
            live = local_shard(p.detach())
            value = self.average[i].to(live.device)
            if self.theta0:
                value = value + self.alpha * (live.to(value.dtype) - self.theta0[i].to(live.device))
            live.copy_(value)

    def _averaging(self) -> bool:
        """Whether there is an average to use: none during the burn-in (`update_after`)."""
        return bool(self.params) and self._steps >= self.update_after

    @contextlib.contextmanager
    def eval_weights(self, module) -> Iterator[None]:
        """The averaged weights in the model; the live ones are backed up and restored exactly.
        During the burn-in (`update_after`) the live weights themselves."""
        if not (self.eval_with_ema and self._averaging()):
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
        if self.final == "ema" and self._averaging():  # a fit within its burn-in keeps what it trained
            self._load_average(module)

    def state_dict(self) -> dict[str, Any]:
        state = {"average": [gather_like(a, p) for a, p in zip(self.average, self.params, strict=True)],
                 "num_updates": self.num_updates, "steps": self._steps, "decay": self.decay}
        if self.theta0:
            state.update(theta0=[gather_like(t, p) for t, p in zip(self.theta0, self.params, strict=True)],
                         alpha=self.alpha)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.params):
            raise ValueError(
                f"{self.name}: the checkpoint averages {len(state['average'])} tensors but the model "
                f"has {len(self.params)} trainable ones; it was saved for another model or LoRA setup"
            )
        if bool(self.theta0) != ("theta0" in state):
            raise ValueError(f"{self.name}: the checkpoint was saved {'with' if 'theta0' in state else 'without'} "
                             "BEMA's bias correction; resume with the bias_power it was saved with")
        self.average = [shard_like(saved, p).to(a.device, a.dtype)
                        for saved, a, p in zip(state["average"], self.average, self.params, strict=True)]
        if self.theta0:
            self.theta0 = [shard_like(saved, p).to(a.device, a.dtype)
                           for saved, a, p in zip(state["theta0"], self.theta0, self.params, strict=True)]
            self.alpha = state["alpha"]
        self.num_updates, self._steps = state["num_updates"], state["steps"]
