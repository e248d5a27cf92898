"""A callback for the multi-process tests: records, per rank, what a resumed fit must restore.

Used from the fit YAML the tests write (`tests.dist_probe.Probe`); each record is a file
`<out>/<phase>-rank<r>.pt` read back by `tests/test_distributed.py`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from cfs_lightning.training.regularizers import EMA, L2ToInit
from cfs_lightning.training.sharding import local_shard
from cfs_lightning.training.sharding import is_sharded


class Probe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.replay_rows: list[list[int]] = []

    def _record(self, phase: str, trainer: L.Trainer, module: L.LightningModule) -> None:
        ema = next(r for r in module.regularizers if isinstance(r, EMA))
        l2 = next(r for r in module.regularizers if isinstance(r, L2ToInit))
        reference = module.reference.net
        record = {
            "step": trainer.global_step,
            "world_size": trainer.world_size,
            # The optimizer's parameters: under FSDP2 the sharded ones (the module may be holding
            # gathered copies of its root unit between a forward and the next backward).
            "params": [local_shard(p.detach()).cpu().clone()
                       for p in trainer.optimizers[0].param_groups[0]["params"]],
            "ema_average": [a.cpu().clone() for a in ema.average],
            "ema_updates": ema.num_updates,
            "ema_theta0": [t.cpu().clone() for t in ema.theta0],
            "ema_alpha": ema.alpha,
            "l2_initial": [t.cpu().clone() for t in l2.initial],
            "model_sharded": is_sharded(module.model),
            "reference_sharded": is_sharded(reference),
            "reference_shares_params": bool({id(p) for p in reference.parameters()}
                                            & {id(p) for p in module.model.parameters()}),
            "replay_rows": list(self.replay_rows),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out / f"{phase}-rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record("start", trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids, mask = batch["replay"]["input_ids"], batch["replay"]["attention_mask"]
        self.replay_rows += [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._record("saved", trainer, pl_module)
