"""The DataModule: task batches interleaved with replay batches at a fixed ratio."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..shards import (
    Kind,
    MANIFEST,
    REPLAY_WAIVER,
    check_manifest,
    check_rows,
    load_shards,
    read_manifest,
    require_kind,
)
from ..loading import load_tokenizer
from ..streams import REPLAY, TASK, StreamProducer
from ..tasks import TaskSource
from ..tokens import pad_token_id
from .collate import Collator
from .replay import ReplayConfig
from .samplers import CyclingSampler, TaskSampler

log = logging.getLogger(__name__)


def replay_batch_size(replay_ratio: float, batch_size: int) -> int:
    """Replay sequences per step: round(ratio x task batch size), at least 1 when ratio > 0."""
    if replay_ratio == 0:
        return 0
    return max(1, math.floor(replay_ratio * batch_size + 0.5))


class ReplayDataModule(L.LightningDataModule, StreamProducer):
    """Yields `{"task": batch, "replay": batch}` every training step.

    The epoch is defined by the task data; replay is read memory-mapped from the shards and cycles
    when exhausted. Validation runs the task's validation split and a held-out slice of replay,
    each batch wrapped as `{"task": ...}` or `{"replay": ...}`.

    A stream producer (`cfs_lightning.streams.StreamProducer`): it declares the streams of its
    training batches, which the LightningModule checks against what its loss terms read.
    """

    def __init__(
        self,
        task: TaskSource,
        tokenizer: str | None = None,
        batch_size: int = 16,
        replay_ratio: float = 0.0,
        replay: ReplayConfig | None = None,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        group_by_length: bool = False,
    ) -> None:
        """
        Args:
            task: The task dataset and how to template it.
            tokenizer: Tokenizer name or directory; linked from `model.pretrained` by `cfs fit`.
            batch_size: Task sequences per step (per process).
            replay_ratio: Replay sequences drawn per task sequence (0 disables replay in training;
                held-out replay is still validated when `replay` is given).
            replay: Replay shards to mix in.
            val_batch_size: Batch size of the validation loaders; default `batch_size`.
            num_workers: DataLoader worker processes.
            seed: Seed of the task shuffle and of the replay cycling order.
            group_by_length: Put task sequences of similar length in the same batch (within
                windows of 64 shuffled batches; see `TaskSampler`), so that less of every step is
                padding: an epoch of the GSM8K training split at batch 16 with the toy tokenizer
                holds 2.08M token positions instead of 3.47M (2.06M of them real tokens).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if (isinstance(replay_ratio, bool) or not isinstance(replay_ratio, (int, float))
                or not math.isfinite(replay_ratio) or replay_ratio < 0):
            raise ValueError(f"data.replay_ratio must be a finite number >= 0 (replay sequences per task "
                             f"sequence, e.g. 0.1), got {replay_ratio!r}")
        if replay_ratio > 0 and replay is None:
            raise ValueError(
                f"data.replay_ratio={replay_ratio} needs replay shards: set data.replay.dir"
            )
        self.task, self.tokenizer_name, self.batch_size = task, tokenizer, batch_size
        self.replay_ratio, self.replay = replay_ratio, replay
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed, self.group_by_length = num_workers, seed, group_by_length
        self.replay_batch_size = replay_batch_size(replay_ratio, batch_size)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, object] = {}
        self.shard_manifests: dict[str, tuple[dict, str | None]] = {}
        """What `setup` read that must come from the model being fine-tuned: where -> (manifest,
        how to waive the check, or None). The LightningModule, which owns the model, checks
        them against its weights before fitting (`check_manifest`)."""
        self._resume: dict[str, int] | None = None

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams of every training batch: `task`, and `replay` when replay is mixed in."""
        return (TASK, REPLAY) if self.replay_batch_size else (TASK,)

    def describe(self) -> str:
        return f"data.replay_ratio={self.replay_ratio}"

    def how_to_stop(self, stream: str) -> str:
        return "set data.replay_ratio to 0 (the held-out replay is still validated)"

    # -- lifecycle -------------------------------------------------------------------------------

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError("data.tokenizer is not set (cfs fit links it from model.pretrained)")
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        return self.tokenizer

    def prepare_data(self) -> None:
        """Refuse a replay directory that is not there yet (the DataModule reads shards; `cfs
        generate`, or a data step of `cfs study`, writes them)."""
        if self.replay is not None and not (Path(self.replay.dir) / MANIFEST).is_file():
            read_manifest(self.replay.dir)  # raises, naming the command that writes it

    def setup(self, stage: str | None = None) -> None:
        tok = self._load_tokenizer()
        if stage in (None, "fit"):
            self.datasets["task_train"] = (self._task_shards(tok) if self.task.shards
                                           else self.task.tokenize(self.task.load(self.task.split), tok))
        if self.task.val_split is not None and stage in (None, "fit", "validate"):
            self.datasets["task_val"] = self.task.tokenize(self.task.load(self.task.val_split), tok)
        if self.task.test_split is not None and stage in (None, "test"):
            self.datasets["task_test"] = self.task.tokenize(self.task.load(self.task.test_split), tok)
        if self.replay is not None:
            # The model is compared only before fitting, when it still holds the base weights;
            # validate/test evaluate fine-tuned models on purpose.
            self._setup_replay(tok, check_model=stage in (None, "fit") and self.replay.strict)

    def _task_shards(self, tok: PreTrainedTokenizerBase):
        """The training split as written by a task rewriter (self-output, rephrase, token-mask)."""
        manifest, rows = self._read_shards("task.shards", self.task.shards, "task", tok,
                                           "give it as data.replay.dir instead", waiver=None)
        if manifest["source"] == "token_mask":
            log.info("task shards %s: %.1f%% of response tokens masked (tau=%s, mode=%s)", self.task.shards,
                     100 * manifest["stats"]["masked_fraction"], manifest["tau"], manifest["mode"])
        return rows

    def _setup_replay(self, tok: PreTrainedTokenizerBase, check_model: bool) -> None:
        replay = self._read_replay("dir", self.replay.dir, tok, check_model)
        if self.replay.val_dir is not None:
            held_out = self._read_replay("val_dir", self.replay.val_dir, tok, check_model)
            n_val = min(self.replay.val_size, len(held_out))
            self.datasets["replay_train"] = replay
        else:
            held_out, n_val = replay, min(self.replay.val_size, len(replay))
            if self.replay_ratio > 0 and n_val == len(replay):
                raise ValueError(
                    f"replay.val_size={self.replay.val_size} holds out all {len(replay)} replay "
                    "sequences, leaving none to train on; lower replay.val_size or generate more"
                )
            self.datasets["replay_train"] = replay.select(range(len(replay) - n_val))
        if n_val:
            self.datasets["replay_val"] = held_out.select(range(len(held_out) - n_val, len(held_out)))

    def _read_replay(self, field: str, path: str, tok: PreTrainedTokenizerBase, check_model: bool):
        return self._read_shards(f"replay.{field}", path, "replay", tok,
                                 "it replaces the task's targets: give it as data.task.shards instead",
                                 waiver=REPLAY_WAIVER, check_model=check_model)[1]

    def _read_shards(self, field: str, path: str, kind: Kind, tok: PreTrainedTokenizerBase, fix: str,
                     waiver: str | None, check_model: bool = True):
        """A shard directory's manifest and rows, refused if of the other kind, of another tokenizer
        or with rows no batch can be made of; listed in `shard_manifests` for the model's check."""
        where = f"{kind} shards in {path}"
        manifest = read_manifest(path)
        require_kind(manifest, kind, f"data.{field}={path}", fix)
        check_manifest(manifest, tok, where=where)
        if check_model:
            self.shard_manifests[where] = (manifest, waiver)
        rows = load_shards(path)
        check_rows(rows, len(tok), where)
        return manifest, rows

    # -- loaders ---------------------------------------------------------------------------------

    def _pad_id(self) -> int:
        tok = self._load_tokenizer()
        return pad_token_id(tok)

    def _loader(self, name: str, batch_size: int, stream: str | None = None, **kwargs) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=batch_size,
            collate_fn=Collator(self._pad_id(), stream),
            num_workers=self.num_workers,
            **kwargs,
        )

    def train_dataloader(self) -> CombinedLoader:
        ranks = self._ranks()
        data = self.datasets["task_train"]
        grouping = ({"lengths": [len(ids) for ids in data["input_ids"]], "batch_size": self.batch_size}
                    if self.group_by_length else {})
        task = TaskSampler(len(data), seed=self.seed, **ranks, **grouping)
        loaders = {TASK: self._loader("task_train", self.batch_size, sampler=task)}
        if self.replay_batch_size:
            n_steps = len(loaders[TASK])
            self._check_passes(n_steps, ranks["num_replicas"])
            replay = CyclingSampler(len(self.datasets["replay_train"]), n_steps * self.replay_batch_size,
                                    seed=self.seed, **ranks)
            loaders[REPLAY] = self._loader("replay_train", self.replay_batch_size, sampler=replay)
        if self._resume is not None:  # continue the epoch a checkpoint was taken in, where it was
            epoch, batches = self._resume["epoch"], self._resume["batches"]
            for loader in loaders.values():
                loader.sampler.resume(epoch, batches * loader.batch_size)
            self._resume = None
        return CombinedLoader(loaders, mode="min_size")

    def _check_passes(self, steps_per_epoch: int, world: int) -> None:
        """Say how often the fit shows each replay sequence; refuse more than `replay.max_passes`."""
        trainer, n = self.trainer, len(self.datasets["replay_train"])
        if trainer is None:
            return
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        batches = [steps_per_epoch * epochs] if epochs else []
        if trainer.max_steps > 0:
            batches.append(trainer.max_steps * trainer.accumulate_grad_batches)
        if not batches:
            return  # an open-ended fit: nothing to count
        draws = min(batches) * self.replay_batch_size * world
        passes = math.ceil(draws / n)
        log.info("replay: %d draws from %d sequences, each seen %s", draws, n,
                 "once at most" if passes == 1 else f"up to {passes} times")
        if self.replay.max_passes is not None and passes > self.replay.max_passes:
            raise ValueError(
                f"replay.max_passes={self.replay.max_passes}: this fit draws {draws} replay sequences "
                f"({min(batches)} steps x {self.replay_batch_size} per step x {world} processes) from "
                f"{n} in {self.replay.dir}, so each is seen up to {passes} times; generate at least "
                f"{math.ceil(draws / self.replay.max_passes)} (budget.sequences), lower "
                "data.replay_ratio or train fewer steps")

    def _ranks(self) -> dict[str, int]:
        """This process's data-parallel rank and their number, as the trainer's strategy deals them."""
        strategy = self.trainer.strategy if self.trainer is not None else None
        if isinstance(strategy, ParallelStrategy) and strategy.distributed_sampler_kwargs:
            kwargs = strategy.distributed_sampler_kwargs
            return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]}
        return {"num_replicas": 1, "rank": 0}

    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: the epoch and the batches of it already trained on."""
        if self.trainer is None:
            return {}
        loop = self.trainer.fit_loop
        return {"epoch": loop.epoch_progress.current.completed,
                "batches": loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = state or None

    def _eval_loaders(self, task_split: str) -> list[DataLoader]:
        return [
            self._loader(name, self.val_batch_size, stream=stream)
            for name, stream in ((task_split, TASK), ("replay_val", REPLAY))
            if name in self.datasets
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("task_val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("task_test")
