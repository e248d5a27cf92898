"""Squared l2 distance of the trainable weights to their initial values (the l2-SP baseline)."""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

from ..sharding import local_shard
from .base import Regularizer


class _SquaredDistance(torch.autograd.Function):
    """sum_i ||p_i - p0_i||^2 over lists of same-device tensors, with fused (foreach) kernels.

    A handful of kernel launches for the whole model instead of five per parameter, and no
    difference tensor kept between forward and backward: the backward recomputes it (the
    parameters do not change in between) and returns 2 (p_i - p0_i) x grad.
    """

    @staticmethod
    def forward(ctx, initial: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.initial = initial
        ctx.save_for_backward(*params)
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        norms = torch._foreach_norm(torch._foreach_sub(params, initial), 2, dtype=dtype)
        return torch.stack(norms).pow(2).sum()  # at least float32 whatever the parameter dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        diffs = torch._foreach_sub(ctx.saved_tensors, ctx.initial)
        torch._foreach_mul_(diffs, 2 * grad)
        return (None, *diffs)


class L2ToInit(Regularizer):
    """||theta - theta_0||^2 summed over the trainable parameters.

    theta_0 is snapshotted in `setup`, i.e. after the model is built and sharded and before a
    checkpoint is restored, so a resumed run measures distance to the same initial weights
    without storing them in the checkpoint. Under FSDP2 parameters are DTensors: the snapshot
    keeps each rank's shard only, and the sum over shards is all-reduced (`full_tensor()`), so
    every rank sees the global value and gradient.
    """

    per_parameter_state = True

    def __init__(self, weight: float = 1e-3, offload: bool = False, name: str | None = None) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            offload: Keep theta_0 in CPU memory (copied to the accelerator one parameter at a
                time each step) to save accelerator memory at the cost of transfers.
            name: Log key suffix; default `l2_to_init`.
        """
        super().__init__(weight, name)
        self.offload = offload
        self.params: list[torch.nn.Parameter] = []
        self.initial: list[torch.Tensor] = []

    def setup(self, module) -> None:
        self.params = [p for p in module.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{self.name}: the model has no trainable parameter")
        self.initial = [self._snapshot(p) for p in self.params]

    def _snapshot(self, p: torch.Tensor) -> torch.Tensor:
        local = local_shard(p.detach())
        return local.to("cpu", copy=True) if self.offload else local.clone()

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.offload or any(isinstance(p, DTensor) for p in self.params):
            return self._per_parameter()
        if self.initial[0].device != self.params[0].device:  # the model was placed after setup
            self.initial = [p0.to(p.device) for p0, p in zip(self.initial, self.params, strict=True)]
        return _SquaredDistance.apply(self.initial, *self.params)

    def _per_parameter(self) -> torch.Tensor:
        """One parameter at a time: an offloaded theta_0 crosses to the device a tensor at a time,
        and sharded (DTensor) sums are all-reduced."""
        total = None
        for i, (p, p0) in enumerate(zip(self.params, self.initial, strict=True)):
            local = local_shard(p)
            if p0.device != local.device:
                p0 = p0.to(local.device, non_blocking=True)
                if not self.offload:  # the model was placed on its device after setup: move once
                    self.initial[i] = p0
            if isinstance(p, DTensor):  # the global shape: shards of unevenly split dims differ in size
                p0 = DTensor.from_local(p0, p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
            diff = p - p0
            sq = diff.to(torch.promote_types(diff.dtype, torch.float32)).pow(2).sum()
            if isinstance(sq, DTensor):
                sq = sq.full_tensor()  # sum of the shards' partial sums, on every rank
            total = sq if total is None else total + sq
        return total
