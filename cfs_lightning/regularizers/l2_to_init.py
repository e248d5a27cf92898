"""Squared l2 distance of the trainable weights to their initial values (the l2-SP baseline)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from .base import Regularizer, local_shard


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
        total = None
        for i, (p, p0) in enumerate(zip(self.params, self.initial, strict=True)):
            local = local_shard(p)
            if p0.device != local.device:
                p0 = p0.to(local.device, non_blocking=True)
                if not self.offload:  # the model was placed on its device after setup: move once
                    self.initial[i] = p0
            if isinstance(p, DTensor):
                p0 = DTensor.from_local(p0, p.device_mesh, p.placements, run_check=False)
            diff = p - p0
            sq = diff.to(torch.promote_types(diff.dtype, torch.float32)).pow(2).sum()
            if isinstance(sq, DTensor):
                sq = sq.full_tensor()  # sum of the shards' partial sums, on every rank
            total = sq if total is None else total + sq
        return total
