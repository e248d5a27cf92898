"""Online replay (arXiv 2605.26097): context-free replay regenerated from the frozen model during the
fit; and on-policy samples, the trainable model's own responses to task prompts."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator, Mapping
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from ..data import Collator
from ..sampling import SamplingConfig, sample_context_free, sample_continuations
from ..streams import ONPOLICY, ONPOLICY_TEACHER, REPLAY, TASK, Batch, StepContext, StreamProducer
from ..tokens import IGNORE_INDEX, eval_mode, pad_token_id


class OnlineReplay(L.Callback, StreamProducer):
    """Every `every_n_steps` optimizer steps, samples `num_sequences` fresh context-free sequences
    from the frozen initial model; each step adds `batch_size` of them to the batch's `replay`
    stream, cycling through the current pool.

    It is a stream producer (`cfs_lightning.streams.StreamProducer`): the module asks it for its
    rows at the start of every training batch and merges them into the batch. Where the
    DataModule gives no replay (`data.replay_ratio: 0`) they are the replay stream (online
    instead of cached); where it does, they are appended to the cached rows (on top of the
    cache). Regularizers on `replay` (`NLLReplay`, `KLToReference`) then see them; online rows
    carry no cached top-k (`carries`), so `KLFromCachedTopK`, which reads them, is refused.

    The sampler is the module's frozen reference (`copy`, or with LoRA the model with its adapters
    disabled): the callback declares `needs_reference`, so the module builds one when the fit
    sets up, whether or not a regularizer reads it. Round r (steps r*k .. r*k + k - 1) on rank q
    of W is seeded by (sampling.seed, r * W + q): a resumed fit draws the same sequences again.

    Under gradient accumulation (`trainer.accumulate_grad_batches` A > 1) each micro-batch m of a
    step keeps a pool of its own, sampled at its round's first step (from that micro-batch's task
    prompts with `prompts: task`) and seeded by (sampling.seed, (r * A + m) * W + q): the A
    micro-batches of a step see different rows, as A steps without accumulation would, at A
    times the sampling per round.

    Sharded strategies (FSDP, FSDP2) are refused: generation from a sharded model needs every rank
    in every step and is not supported here; use cached replay (`cfs generate`) there.

    On-policy samples (`sampler: trainable`, `prompts: task`, `stream: onpolicy`): the pool is
    the trainable model's own responses, sampled with its current weights, to the prompts of the
    task batch at the refill step (cycled to `num_sequences`); only the response tokens are
    targets. With `KLToReference(on: onpolicy, direction: reverse)` the loss is the reverse KL
    to the frozen base on the model's own samples, i.e. GKD with lambda = 1 and the base as the
    teacher (configs/toy/methods/on-policy-kl.yaml). `every_n_steps: 1` is strictly on-policy;
    larger k reuses a pool sampled up to k - 1 steps ago. GKD's `lmbda` (TRL, ms-swift): each
    step is on-policy with probability lmbda (drawn from the seed, the step, the micro-batch and
    the rank); otherwise the stream is the task batch itself, the dataset's own responses.

    With `demonstrations: true` (on-policy rows only) each row also carries the teacher's view
    for self-distillation (`SelfDistillation`, SDFT): the task example the prompt came from
    (its prompt and reference response, as the task data gives them), the `separator`, then
    the row itself (a leading BOS dropped); only the sampled response tokens are targets. These
    rows are the batch's `onpolicy_teacher` stream, aligned with `onpolicy` row by row.
    """

    def __init__(self, every_n_steps: int, num_sequences: int, batch_size: int,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=128, batch_size=32),
                 sampler: Literal["reference", "trainable"] = "reference",
                 prompts: Literal["start", "task"] = "start", stream: str = REPLAY,
                 demonstrations: bool = False, separator: str = "\n\n", lmbda: float = 1.0) -> None:
        """
        Args:
            every_n_steps: Optimizer steps between regenerations (k).
            num_sequences: Sequences sampled per regeneration (the pool), per micro-batch under
                gradient accumulation.
            batch_size: Online sequences added to every training step.
            sampling: How sequences are drawn (temperature 1, no truncation by default).
            sampler: `reference` (the frozen initial model) or `trainable` (the current weights).
            prompts: `start` (context-free: the start token alone) or `task` (the prompts of the
                task batch; only the sampled response tokens are targets).
            stream: The batch stream the rows join (`replay`, or `onpolicy` for a regularizer
                with `on: onpolicy`).
            demonstrations: Also give each on-policy row its teacher's view, the task example
                in context before it (stream `onpolicy_teacher`, for `SelfDistillation`).
            separator: Text between the demonstration and the row in the teacher's view.
            lmbda: On-policy rows with probability lmbda per step, else the task batch's rows
                (GKD's mix; on-policy rows only, without demonstrations); 1: always on-policy.
        """
        for name, value in (("every_n_steps", every_n_steps), ("num_sequences", num_sequences),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"OnlineReplay {name} must be >= 1, got {value}")
        if sampler not in ("reference", "trainable"):
            raise ValueError(f"OnlineReplay.sampler must be 'reference' or 'trainable', got {sampler!r}")
        if prompts not in ("start", TASK):
            raise ValueError(f"OnlineReplay.prompts must be 'start' or 'task', got {prompts!r}")
        if stream not in (REPLAY, ONPOLICY):
            raise ValueError(f"OnlineReplay.stream must be 'replay' or 'onpolicy', got {stream!r}")
        self.every_n_steps, self.num_sequences, self.batch_size = every_n_steps, num_sequences, batch_size
        self.sampling, self.sampler, self.prompts, self.stream = sampling, sampler, prompts, stream
        if demonstrations and (stream, prompts) != (ONPOLICY, TASK):
            raise ValueError("OnlineReplay.demonstrations needs prompts: task and stream: onpolicy "
                             f"(the teacher sees the task example its row was prompted from), got "
                             f"prompts: {prompts}, stream: {stream}")
        if not 0 <= lmbda <= 1 or (lmbda < 1 and ((stream, prompts) != (ONPOLICY, TASK) or demonstrations)):
            raise ValueError(f"OnlineReplay.lmbda must be in [0, 1], and below 1 only for on-policy rows "
                             f"(prompts: task, stream: onpolicy) without demonstrations; got {lmbda}")
        self.demonstrations, self.separator, self.lmbda = demonstrations, separator, lmbda
        self.streams = (stream, ONPOLICY_TEACHER) if demonstrations else (stream,)
        """The batch streams this callback adds rows to (a regularizer must read each)."""
        self.needs_reference = sampler == "reference"  # the module builds one at fit start
        self.rounds = 0  # pools sampled so far (one per round, times the accumulation)
        self._pools: dict[int, list[dict]] = {}  # micro-batch index within a step -> its pool
        self._rounds: dict[int, int] = {}  # micro-batch index -> the round its pool was sampled for

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                "OnlineReplay samples from an unsharded frozen model and does not run under FSDP or "
                "FSDP2; use DDP, or cached replay written by `cfs generate`"
            )

    def carries(self, stream: str) -> tuple[str, ...]:
        return ()  # sampled rows: no cached top-k

    def describe(self) -> str:
        demonstrations = ", demonstrations: true" if self.demonstrations else ""
        return f"the OnlineReplay callback (stream: {self.stream}{demonstrations})"

    def how_to_stop(self, stream: str) -> str:
        return "set OnlineReplay.demonstrations to false" if stream == ONPOLICY_TEACHER else "remove the callback"

    @contextlib.contextmanager
    def _sampling_model(self, module: L.LightningModule) -> Iterator[torch.nn.Module]:
        if self.sampler == "reference":
            with module.reference.as_causal_lm() as model:
                yield model
            return
        with eval_mode(module.hf_model) as model:  # the weights being trained (LoRA on), dropout off
            yield model

    def _refill(self, module: L.LightningModule, batch: Mapping[str, Batch], seed: int) -> list[dict]:
        """A fresh pool sampled with `seed`: context-free rows, or responses to the task prompts."""
        cfg = dataclasses.replace(self.sampling, seed=seed)
        tok = module.tokenizer
        self.rounds += 1
        with self._sampling_model(module) as model:
            if self.prompts == "start":
                return [r for b in sample_context_free(model, tok, cfg, self.num_sequences, None) for r in b]
            prompts = task_prompts(batch[TASK])
            rows = [i % len(prompts) for i in range(self.num_sequences)]
            if self.demonstrations:  # the teacher's context: each row's own task example
                sep = tok(self.separator, add_special_tokens=False)["input_ids"] if self.separator else []
                examples = [ids[m.bool()].tolist() + sep for ids, m in
                            zip(batch[TASK]["input_ids"], batch[TASK]["attention_mask"], strict=True)]
            pool = []
            for b, first in enumerate(range(0, len(rows), cfg.batch_size)):
                chunk = rows[first:first + cfg.batch_size]
                samples = sample_continuations(model, tok, cfg, [prompts[i] for i in chunk], b)
                for i, rec in zip(chunk, samples, strict=True):
                    n = rec.pop("n_prompt")
                    rec["labels"] = [IGNORE_INDEX] * n + rec["input_ids"][n:]
                    if self.demonstrations:
                        rec.update(teacher_view(examples[i], rec["input_ids"], n, tok.bos_token_id))
                    pool.append(rec)
            return pool

    def _seed(self, step: StepContext, draw: int) -> int:
        """The seed of this rank's `draw`-th pool (round * accumulation + micro-batch)."""
        return self.sampling.seed * 1_000_003 + draw * step.world_size + step.rank

    def _on_policy(self, step: StepContext) -> bool:
        """Whether this step's rows are sampled (probability `lmbda`), drawn from the seed, the step,
        the micro-batch and the rank, so that a resumed fit draws alike."""
        draw = step.global_step * step.accumulation + step.micro_batch
        return self.lmbda >= 1 or random.Random(self._seed(step, draw)).random() < self.lmbda

    def rows(self, batch: Mapping[str, Batch], step: StepContext, module: L.LightningModule) -> dict[str, Batch]:
        """This step's `batch_size` rows of the micro-batch's pool (refilled at its round's first
        step), and with `demonstrations` their teacher's view."""
        micro, round_index = step.micro_batch, step.global_step // self.every_n_steps
        if not self._on_policy(step):  # GKD's dataset step: the task batch's own responses
            return {self.stream: {k: batch[TASK][k] for k in ("input_ids", "attention_mask", "labels")}}
        if self._rounds.get(micro) != round_index:
            draw = round_index * step.accumulation + micro
            self._pools[micro] = self._refill(module, batch, self._seed(step, draw))
            self._rounds[micro] = round_index
        pool = self._pools[micro]
        first = (step.global_step % self.every_n_steps) * self.batch_size
        rows = [pool[(first + j) % len(pool)] for j in range(self.batch_size)]
        collate = Collator(pad_token_id(module.tokenizer))
        added = {self.stream: collate(rows)}
        if self.demonstrations:
            added[ONPOLICY_TEACHER] = collate([{"input_ids": r["teacher_input_ids"], "labels": r["teacher_labels"]}
                                               for r in rows])
        return added


def teacher_view(context: list[int], ids: list[int], n_prompt: int, bos_id: int | None) -> dict[str, list[int]]:
    """The teacher's row for self-distillation: `context` (a demonstration and separator), then
    the student's row `ids` (prompt of `n_prompt` tokens, then the response) without a leading
    BOS; only the response tokens are targets."""
    drop = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    prefix = context + ids[drop:n_prompt]
    response = ids[n_prompt:]
    return {"teacher_input_ids": prefix + response,
            "teacher_labels": [IGNORE_INDEX] * len(prefix) + response}


def task_prompts(task: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each task row's prompt: its tokens before the first response token (the first label)."""
    prompts = []
    for ids, labels in zip(task["input_ids"].tolist(), task["labels"].tolist(), strict=True):
        first = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), None)
        if not first:  # no response token, or one at position 0 (never a target)
            raise ValueError("a task row has no prompt before its response; on-policy sampling "
                             "needs prompt-response task data (task.prompt and task.response)")
        prompts.append(ids[:first])
    return prompts
