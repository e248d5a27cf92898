"""What validation and test log per stream, token-weighted over the epoch: the NLL (`val/task_loss`,
`val/replay_nll`, nats per token) and the forgetting meter (`val/task_kl`, `val/replay_kl`:
`meter.py`); `test/...` alike."""

from __future__ import annotations

import logging

from torch import nn
from torchmetrics import MeanMetric

from ..scores import METER_KEYS, VAL_KEYS
from ..streams import CACHED_TOPK, REPLAY, Batch
from .heads import Logits
from .losses import token_nll
from .meter import forgetting_kl, meter_source
from .reference import FrozenReference

STAGES = ("val", "test")

log = logging.getLogger(__name__)


class EvalMetrics(nn.Module):
    """Running means of each stream's NLL and forgetting KL, one set per stage.

    A submodule of the LightningModule, so that Lightning finds the metrics it is given to log;
    their states are not saved in checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nll = nn.ModuleDict({stage: nn.ModuleDict({s: MeanMetric() for s in VAL_KEYS}) for stage in STAGES})
        self.kl = nn.ModuleDict({stage: nn.ModuleDict({s: MeanMetric() for s in METER_KEYS}) for stage in STAGES})
        self._said: set[str] = set()  # what the meter reads, said once per stream

    def reset(self, stage: str) -> None:
        """Start `stage`'s means afresh."""
        for metric in (*self.nll[stage].values(), *self.kl[stage].values()):
            metric.reset()

    def update(self, stage: str, stream: str, logits: Logits, batch: Batch,
               reference: FrozenReference | None) -> dict[str, MeanMetric]:
        """Add one batch of `stream`; returns the metrics to log, by key."""
        total, count = token_nll(logits, batch["labels"])
        self.nll[stage][stream].update(total / count, weight=count)  # token-weighted over the epoch
        logged = {f"{stage}/{VAL_KEYS[stream]}": self.nll[stage][stream]}
        self._say_meter_source(stream, batch, reference)
        divergence = forgetting_kl(logits, batch, reference)
        if divergence is not None:
            self.kl[stage][stream].update(divergence, weight=count)
            logged[f"{stage}/{METER_KEYS[stream]}"] = self.kl[stage][stream]
        return logged

    def _say_meter_source(self, stream: str, batch: Batch, reference: FrozenReference | None) -> None:
        """Log once per stream what the forgetting meter reads, or why it is off."""
        if stream in self._said:
            return
        self._said.add(stream)
        key, source = f"val/{METER_KEYS[stream]}", meter_source(reference, batch)
        if source == "reference":
            log.info("%s: exact KL(p_base || p_theta) to the frozen reference, full vocabulary", key)
        elif source == "topk":
            log.info("%s: KL(p_base || p_theta) coarsened to the replay shards' cached top-%d tokens "
                     "plus one tail bucket (a lower bound of the exact KL)", key, batch[CACHED_TOPK[0]].size(-1))
        else:
            log.info("%s is off: no frozen reference%s; set model.reference=copy to measure it", key,
                     " and no cached top-k in the replay shards" if stream == REPLAY else "")
