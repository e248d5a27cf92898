"""lm-eval's HFLM over the in-memory model being trained: its requests split over processes, its
progress counted on one bar of ours, and lm-eval's own per-evaluation output left out.

This module imports lm-eval; `evaluate_lm` imports it only when an evaluation runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import lm_eval.api.task
import torch
import torch.distributed as dist
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

IN_MEMORY_MODEL_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)
"""What HFLM warns on every construction from a model object: that other model arguments may be
ignored (none are given) and that it assumes one process (`InMemoryLM` sets up the ranks itself).
Both hold by design here, so they are left out; any other lm-eval warning still shows."""


@contextlib.contextmanager
def _dropping(logger: logging.Logger, prefixes: tuple[str, ...]) -> Iterator[None]:
    """`logger`'s records whose message starts with one of `prefixes` dropped for the block."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefixes)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextlib.contextmanager
def without_document_bars() -> Iterator[None]:
    """lm-eval's bar over each task's documents (`Task.build_all_requests`, one per task and
    evaluation) off for the block: no setting turns it off, so its module's `tqdm` is swapped for a
    disabled one and put back after. The requests are counted on `InMemoryLM.progress` instead."""
    saved = lm_eval.api.task.tqdm
    lm_eval.api.task.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        lm_eval.api.task.tqdm = saved


class ProgressLine:
    """One progress line for a whole evaluation, drawn when the first requests arrive. Its total
    grows as lm-eval hands each kind of request over, so its time left covers those so far."""

    def __init__(self, label: str, shown: bool = True) -> None:
        self.label, self.shown = label, shown
        self.bar: tqdm | None = None

    def expect(self, n: int) -> None:
        """`n` more sequences to score."""
        if self.bar is None:
            # A terminal redraws the line in place; a log file keeps every redraw, so there it is
            # redrawn every 30 s only.
            self.bar = tqdm(total=n, desc=self.label, unit="seq", disable=not self.shown, dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 30.0)
        else:
            self.bar.total += n
            self.bar.refresh()

    def advance(self, n: int) -> None:
        """`n` more sequences scored (at most those expected: a distributed rolling log-likelihood
        pads this rank's windows to the longest rank's)."""
        if self.bar is not None:
            self.bar.update(max(0, min(n, self.bar.total - self.bar.n)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class InMemoryLM(HFLM):
    """lm-eval's HFLM over an in-memory model, which knows its rank in torch.distributed and
    counts the sequences it scores on one progress bar.

    Distributed: lm-eval asks the model for `rank`, `world_size`, `all_gather`, `gather_object`
    and `barrier` to split requests over processes; HFLM answers them through Hugging Face
    Accelerate, which an in-memory model does not have, so here they go to torch.distributed
    directly. Under FSDP (`sharded`), generation runs with `synced_gpus` so that every rank keeps
    stepping until the longest generation on any rank is done.

    Progress: HFLM draws a bar per request type, and one per batch of windows of a rolling
    log-likelihood (`disable_tqdm=False` is hard-coded there); all of them are turned off, and
    `progress` counts instead the sequences this process scores: a request each, or for a
    rolling log-likelihood each window of its document.
    """

    def __init__(self, *, progress: ProgressLine, sharded: bool = False, **kwargs: Any) -> None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # One request per forward group: lm-eval's shared-context grouping could give the
            # ranks different numbers of forward passes.
            kwargs["logits_cache"] = False
        with _dropping(logging.getLogger(HFLM.__module__), IN_MEMORY_MODEL_WARNINGS):
            super().__init__(**kwargs)
        if distributed:
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.progress, self.sharded = progress, sharded
        self._rows: int | None = None  # model rows of the current scoring call, counted as they run

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _counting(self, requests: list, score: Callable[..., list], *args: Any, **kwargs: Any) -> list:
        """`score(requests, ...)` with its rows counted as they run, then the requests that shared
        a row with another (lm-eval's logits cache) counted at its end."""
        self._rows = 0
        try:
            results = score(requests, *args, **kwargs)
        finally:
            rows, self._rows = self._rows, None
        self.progress.advance(len(requests) - rows)
        return results

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        self.progress.expect(len(requests))
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        # lm-eval cuts a document of n tokens into ceil(n / max_length) windows
        # (`get_rolling_token_windows` with context_len=1), one model row each.
        lengths = [len(self.tok_encode(request.args[0])) for request in requests]
        self.progress.expect(sum(-(-n // self.max_length) for n in lengths))
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list:
        return self._counting(requests, super()._loglikelihood_tokens, disable_tqdm=True,
                              override_bs=override_bs)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        self.progress.expect(len(requests))
        return self._counting(requests, super().generate_until, disable_tqdm=True)

    def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = super()._model_call(inps, *args, **kwargs)
        self._count(inps.size(0))
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        if self.sharded:
            generation_kwargs["synced_gpus"] = True
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._count(context.size(0))
        return out

    def _count(self, rows: int) -> None:
        if self._rows is not None:  # not a batch-size probe
            self._rows += rows
            self.progress.advance(rows)
