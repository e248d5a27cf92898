"""`evaluate_lm`: lm-eval scores of an in-memory model, with one progress line per evaluation."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..tokens import eval_mode
from .tasks import task_manager_for, task_name, uses_chat_template

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


def evaluate_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str | dict],
    batch_size: int = 16,
    limit: int | float | None = None,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    task_manager: TaskManager | None = None,
    sharded: bool = False,
) -> tuple[dict[str, float], dict[str, bool]] | None:
    """lm-eval scores of an in-memory model: ({"<task>/<metric>": value}, {...: higher_is_better}).

    In a distributed run every rank must call it: the documents are split over the ranks and the
    scores come back on rank 0 only (None elsewhere). `sharded`: the model is FSDP-sharded.
    The model's train/eval mode and the Python, NumPy and torch RNG states are left as they were.
    Rank 0 shows one progress line: the tasks, the sequences scored of all, the time taken and
    left (lm-eval's own bars and its warnings about in-memory models are left out).
    """
    # lm-eval (seconds to import) loads here, when an evaluation runs, not with every `cfs fit`:
    # `.hflm` subclasses its HFLM, so it is imported here too.
    from lm_eval import simple_evaluate

    from .hflm import InMemoryLM, ProgressLine, without_document_bars

    if task_manager is None:
        task_manager = task_manager_for(tasks)
    groups = _by_chat_template(tasks, tokenizer)
    shown = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    progress = ProgressLine(_progress_label(tasks), shown)
    values: dict[str, float] = {}
    better: dict[str, bool] = {}
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        # lm-eval calls model.eval(); eval_mode gives the model back in the mode it came in.
        with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[]), without_document_bars():
            lm = InMemoryLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                            add_bos_token=add_bos_token, progress=progress, sharded=sharded)
            for group, apply_chat in groups:  # lm-eval applies a chat template to all tasks of a call
                results = simple_evaluate(
                    model=lm, tasks=group, limit=limit, bootstrap_iters=0, log_samples=False,
                    task_manager=task_manager, random_seed=None, numpy_random_seed=None,
                    torch_random_seed=None, apply_chat_template=apply_chat,
                )
                if results is not None:
                    got = _flatten(results)
                    values.update(got[0])
                    better.update(got[1])
    finally:
        progress.close()
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (values, better) if values else None


def _by_chat_template(tasks: list[str | dict], tokenizer: PreTrainedTokenizerBase) -> list[tuple[list, bool]]:
    """The tasks in one lm-eval call per chat-template setting: (tasks, apply_chat_template)."""
    chat = [t for t in tasks if uses_chat_template(t)]
    if chat and not tokenizer.chat_template:
        raise ValueError(
            f"task(s) {[task_name(t) for t in chat]} ask for the model's chat template (metadata.chat_template: "
            f"true) but tokenizer {tokenizer.name_or_path!r} has none: leave them out for a base model, "
            "or give the tokenizer a chat_template")
    return [(group, group is chat) for group in ([t for t in tasks if t not in chat], chat) if group]


def _progress_label(tasks: list[str | dict]) -> str:
    names = [task_name(t) for t in tasks]
    return "lm-eval " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _flatten(results: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval results -> ({"<task>/<metric>": value}, {"<task>/<metric>": higher_is_better})."""
    values, better = {}, {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # metric keys read "<metric>,<filter>"
            if not comma or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}_{filt}"
            values[name] = float(value)
            better[name] = bool(results["higher_is_better"][task].get(metric, False))
    return values, better
