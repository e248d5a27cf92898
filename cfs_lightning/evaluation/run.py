"""`evaluate_lm`: lm-eval scores of an in-memory model, with one progress line per evaluation."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..tokens import eval_mode
from .tasks import task_manager_for, task_name, uses_chat_template

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


class Evaluation(NamedTuple):
    """What `evaluate_lm` gives back."""

    values: dict[str, float]
    """`<task>/<metric> -> score`."""
    better: dict[str, bool]
    """`<task>/<metric> -> higher is better`."""
    items: dict[str, dict[str, list[float]]]
    """With `items=True`: each metric scored 0 or 1 per document, `<task>/<metric> -> {doc_id:
    [score, chance]}`, chance 1/k for a multiple-choice document of k choices, else 0
    (`scores.item_changes` reads them); otherwise empty."""


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
    items: bool = False,
) -> Evaluation | None:
    """lm-eval scores of an in-memory model (`Evaluation`; per document too with `items`).

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
    outcomes: dict[str, dict[str, list[float]]] = {}
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        # lm-eval calls model.eval(); eval_mode gives the model back in the mode it came in.
        with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[]), without_document_bars():
            lm = InMemoryLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                            add_bos_token=add_bos_token, progress=progress, sharded=sharded)
            for group, apply_chat in groups:  # lm-eval applies a chat template to all tasks of a call
                results = simple_evaluate(
                    model=lm, tasks=group, limit=limit, bootstrap_iters=0, log_samples=items,
                    task_manager=task_manager, random_seed=None, numpy_random_seed=None,
                    torch_random_seed=None, apply_chat_template=apply_chat,
                )
                if results is not None:
                    got = _flatten(results)
                    values.update(got[0])
                    better.update(got[1])
                    outcomes.update(_item_outcomes(results) if items else {})
    finally:
        progress.close()
        random.setstate(py_state)
        np.random.set_state(np_state)
    return Evaluation(values, better, outcomes) if values else None


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


def _item_outcomes(results: dict) -> dict[str, dict[str, list[float]]]:
    """From lm-eval's logged samples, every metric that scores each document 0 or 1 (accuracy,
    exact match, ...): `<task>/<metric> -> {doc_id: [score, chance]}` (`Evaluation.items`)."""
    found: dict[str, dict[str, list[float]]] = {}
    for task, samples in results.get("samples", {}).items():
        multiple_choice = results["configs"][task].get("output_type") == "multiple_choice"
        for sample in samples:
            # one request per choice (two with lm-eval's acc_mutual_info)
            choices = len(sample["arguments"]) // (2 if "acc_mutual_info" in sample["metrics"] else 1)
            chance = 1.0 / choices if multiple_choice else 0.0
            for metric in sample["metrics"]:
                filt = sample["filter"]
                name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric}_{filt}"
                found.setdefault(name, {})[str(sample["doc_id"])] = [sample[metric], chance]
    return {name: {doc: [float(v), c] for doc, (v, c) in docs.items()} for name, docs in found.items()
            if all(isinstance(v, (bool, int, float)) and v in (0, 1) for v, _ in docs.values())}


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
