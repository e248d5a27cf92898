"""Online replay (arXiv 2605.26097): context-free replay regenerated from the frozen model during the fit."""

from __future__ import annotations

import dataclasses

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from ..data import Collator
from ..sampling import SamplingConfig, sample_context_free
from ..tokens import IGNORE_INDEX, pad_token_id
from ..training.regularizers import KLFromCachedTopK


class OnlineReplay(L.Callback):
    """Every `every_n_steps` optimizer steps, samples `num_sequences` fresh context-free sequences
    from the frozen initial model; each step adds `batch_size` of them to the batch's `replay`
    stream, cycling through the current pool.

    Where the DataModule gives no replay (`data.replay_ratio: 0`) they are the replay stream
    (online instead of cached); where it does, they are appended to the cached rows (on top of
    the cache). Regularizers on `replay` (`NLLReplay`, `KLToReference`) then see them;
    `KLFromCachedTopK` needs cached top-k, which online rows lack, and is refused.

    The sampler is the module's frozen reference (`copy`, or with LoRA the model with its adapters
    disabled): the callback declares `needs_reference`, so the module builds one at fit start
    when no regularizer asked for it. Round r (steps r*k .. r*k + k - 1) on rank q of W is
    seeded by (sampling.seed, r * W + q): a resumed fit draws the same sequences again.
    Sharded strategies (FSDP, FSDP2) are refused: generation from a sharded model needs every rank
    in every step and is not supported here; use cached replay (`cfs generate`) there.
    """

    needs_reference = True

    def __init__(self, every_n_steps: int, num_sequences: int, batch_size: int,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, batch_size=32)) -> None:
        """
        Args:
            every_n_steps: Optimizer steps between regenerations (k).
            num_sequences: Sequences sampled per regeneration (the pool).
            batch_size: Online replay sequences added to every training step.
            sampling: How sequences are drawn (temperature 1, no truncation by default).
        """
        for name, value in (("every_n_steps", every_n_steps), ("num_sequences", num_sequences),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"OnlineReplay {name} must be >= 1, got {value}")
        self.every_n_steps, self.num_sequences, self.batch_size = every_n_steps, num_sequences, batch_size
        self.sampling = sampling
        self.rounds = 0
        self._pool: list[dict] = []
        self._round: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                "OnlineReplay samples from an unsharded frozen model and does not run under FSDP or "
                "FSDP2; use DDP, or cached replay written by `cfs generate`"
            )
        if any(isinstance(r, KLFromCachedTopK) for r in pl_module.regularizers):
            raise ValueError("OnlineReplay rows carry no cached top-k, which KLFromCachedTopK needs; "
                             "use NLLReplay or KLToReference with online replay")

    def _refill(self, trainer: L.Trainer, pl_module: L.LightningModule, round_index: int) -> None:
        seed = self.sampling.seed * 1_000_003 + round_index * trainer.world_size + trainer.global_rank
        cfg = dataclasses.replace(self.sampling, seed=seed)
        with pl_module.reference.as_causal_lm() as model:
            self._pool = [r for batch in sample_context_free(model, pl_module.tokenizer, cfg, self.num_sequences, None)
                          for r in batch]
        self._round = round_index
        self.rounds += 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if self._round != step // self.every_n_steps:
            self._refill(trainer, pl_module, step // self.every_n_steps)
        first = (step % self.every_n_steps) * self.batch_size
        rows = [self._pool[(first + j) % len(self._pool)] for j in range(self.batch_size)]
        pad = pad_token_id(pl_module.tokenizer)
        online = {k: v.to(pl_module.device) for k, v in Collator(pad)(rows).items()}
        batch["replay"] = merge_batches(batch["replay"], online, pad) if "replay" in batch else online


def merge_batches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Two padded batches as one (input_ids, attention_mask, labels; cached top-k columns, which
    online rows lack, are dropped), right-padded to the wider."""
    width = max(a["input_ids"].size(1), b["input_ids"].size(1))
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.cat([torch.nn.functional.pad(x[k], (0, width - x[k].size(1)), value=v) for x in (a, b)])
            for k, v in fill.items()}
