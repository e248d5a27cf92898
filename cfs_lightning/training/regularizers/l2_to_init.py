"""Squared l2 distance of the trainable weights to their initial values (the l2-SP baseline), and
EWC: the same distance weighted per parameter by the base model's diagonal Fisher."""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

from ...shards import model_fingerprint
from ...shards.fisher import read_fisher, read_record
from ..sharding import local_shard, shard_like
from .base import Regularizer


class _SquaredDistance(torch.autograd.Function):
    """sum_i ||s_i * (p_i - p0_i)||^2 over lists of same-device tensors, with fused (foreach)
    kernels; s_i = 1 without scales.

    A handful of kernel launches for the whole model instead of five per parameter, and no
    difference tensor kept between forward and backward: the backward recomputes it (the
    parameters do not change in between) and returns 2 s_i^2 (p_i - p0_i) x grad.
    """

    @staticmethod
    def forward(ctx, initial: list[torch.Tensor], scales: list[torch.Tensor] | None,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.initial, ctx.scales = initial, scales
        ctx.save_for_backward(*params)
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        diffs = torch._foreach_sub(params, initial)
        if scales is not None:
            torch._foreach_mul_(diffs, scales)
        norms = torch._foreach_norm(diffs, 2, dtype=dtype)
        return torch.stack(norms).pow(2).sum()  # at least float32 whatever the parameter dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        diffs = torch._foreach_sub(ctx.saved_tensors, ctx.initial)
        if ctx.scales is not None:
            torch._foreach_mul_(diffs, ctx.scales)
            torch._foreach_mul_(diffs, ctx.scales)
        torch._foreach_mul_(diffs, 2 * grad)
        return (None, None, *diffs)


class L2ToInit(Regularizer):
    """sum_i F_i (theta_i - theta_0,i)^2 over the trainable parameters: F_i = 1 (l2 to the initial
    weights), or with `fisher` the base model's diagonal Fisher (EWC, logged as `ewc`).

    theta_0 is snapshotted in `setup`, i.e. after the model is built and sharded and before a
    checkpoint is restored, so a resumed run measures distance to the same initial weights
    without storing them in the checkpoint. Under FSDP2 parameters are DTensors: the snapshot
    keeps each rank's shard only, and the sum over shards is all-reduced (`full_tensor()`), so
    every rank sees the global value and gradient.

    EWC without the original data: `cfs fisher` estimates F on the base model's own context-free
    samples (the replay shards) and writes it beside them; here each rank keeps sqrt(F) for its
    own shards, in the parameters' dtype: one more copy of the trainable shards (4 bytes per
    parameter in float32). Per token, 1/2 sum_i F_i (theta_i - theta_0,i)^2 is the quadratic
    approximation at theta_0 of the KL to the base on replay, so `weight` 0.5 matches
    `KLToReference(on: replay)` at weight 1 near the start (with `normalize: token`, the default).
    """

    per_parameter_state = True

    def __init__(self, weight: float = 1e-3, offload: bool = False, fisher: str | None = None,
                 name: str | None = None) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            offload: Keep theta_0 (and sqrt F) in CPU memory (copied to the accelerator one
                parameter at a time each step) to save accelerator memory at the cost of transfers.
            fisher: A folder `cfs fisher` wrote for this base model: weigh each parameter by its
                Fisher (EWC); None: every parameter alike.
            name: Log key suffix; default `ewc` with a Fisher, else `l2_to_init`.
        """
        super().__init__(weight, name or ("ewc" if fisher else None))
        self.offload, self.fisher = offload, fisher
        self.params: list[torch.nn.Parameter] = []
        self.initial: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] | None = None

    def setup(self, module) -> None:
        named = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params:
            raise ValueError(f"{self.name}: the model has no trainable parameter")
        self.initial = [self._snapshot(p) for p in self.params]
        self.scales = self._fisher_scales(module, named) if self.fisher else None

    def check_base(self, model: torch.nn.Module) -> None:
        """Refuse a Fisher estimated for another model (by weights fingerprint), and block expansion."""
        if not self.fisher:
            return
        if getattr(model.config, "expanded_blocks", None):
            raise ValueError(f"{self.name}: EWC weighs the base model's parameters by their Fisher, but the model "
                             "was expanded (trainable.expand_blocks): only its new blocks train, and they have none")
        record = read_record(self.fisher)
        if record["model_fingerprint"] != model_fingerprint(model):
            raise ValueError(f"{self.name}: the Fisher in {self.fisher} was estimated for {record['model']!r} "
                             f"(weights sha256 {record['model_fingerprint'][:12]}…), not for the model being "
                             "fine-tuned; run `cfs fisher` on this base model")

    def _fisher_scales(self, module, named: list[tuple[str, torch.nn.Parameter]]) -> list[torch.Tensor]:
        """sqrt(F) per trainable parameter, this rank's shard (`check_base` checked it is this model's)."""
        values, _ = read_fisher(self.fisher)
        missing = [n for n, p in named if n not in values or tuple(values[n].shape) != tuple(p.shape)]
        if missing:
            raise ValueError(
                f"{self.name}: the Fisher in {self.fisher} has no estimate (of the right shape) for "
                f"{len(missing)} trainable parameter(s), e.g. {missing[0]!r}: it was estimated for another "
                "model, or the trainable parameters are adapters (LoRA), which EWC does not weigh; run "
                "`cfs fisher` on this base model, with full fine-tuning")
        return [self._snapshot(shard_like(values[n], p).to(local_shard(p).device, p.dtype).sqrt_()) for n, p in named]

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        local = local_shard(p.detach())
        return local.to("cpu", copy=True) if self.offload else local.clone()

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.offload or any(isinstance(p, DTensor) for p in self.params):
            return self._per_parameter()
        if self.initial[0].device != self.params[0].device:  # the model was placed after setup
            self.initial = [p0.to(p.device) for p0, p in zip(self.initial, self.params, strict=True)]
            if self.scales is not None:
                self.scales = [s.to(p.device) for s, p in zip(self.scales, self.params, strict=True)]
        return _SquaredDistance.apply(self.initial, self.scales, *self.params)

    def _on_device(self, i: int, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """theta_0 (and sqrt F) of parameter i on its device: an offloaded copy crosses for this
        step; one left behind when the model was placed after setup moves once."""
        p0, scale = self.initial[i], None if self.scales is None else self.scales[i]
        if p0.device != local.device:
            p0 = p0.to(local.device, non_blocking=True)
            scale = None if scale is None else scale.to(local.device, non_blocking=True)
            if not self.offload:
                self.initial[i] = p0
                if scale is not None:
                    self.scales[i] = scale
        return p0, scale

    def _per_parameter(self) -> torch.Tensor:
        """One parameter at a time: an offloaded theta_0 crosses to the device a tensor at a time,
        and sharded (DTensor) sums are all-reduced."""
        total = None
        for i, p in enumerate(self.params):
            p0, scale = self._on_device(i, local_shard(p))
            if isinstance(p, DTensor):  # the global shape: shards of unevenly split dims differ in size
                p0, scale = (None if t is None else DTensor.from_local(
                    t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
                    for t in (p0, scale))
            diff = p - p0 if scale is None else (p - p0) * scale
            sq = diff.to(torch.promote_types(diff.dtype, torch.float32)).pow(2).sum()
            if isinstance(sq, DTensor):
                sq = sq.full_tensor()  # sum of the shards' partial sums, on every rank
            total = sq if total is None else total + sq
        return total
