"""lm-eval on an in-memory model: task files, named suites, and requests split over processes.

`evaluate_lm` scores the model being trained with lm-eval. In a distributed run (DDP, FSDP) every
process calls it: lm-eval hands each rank its slice of the documents, pads the ranks' request
lists to equal length so each process runs the same number of forward passes (FSDP needs every
rank in every forward), and gathers the per-document scores to rank 0, where the metrics are
computed over all documents, as in a one-process run.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import lm_eval
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

SUITES: dict[str, list[str]] = {
    # The zero-shot downstream suite of OLMo (Groeneveld et al., 2024, arXiv 2402.00838).
    "olmo_zero_shot": ["arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa",
                       "sciq", "winogrande"],
    # Grade-school math word problems (Cobbe et al., 2021), lm-eval's 5-shot chain-of-thought-free
    # exact-match task.
    "gsm8k": ["gsm8k"],
}
"""Named lm-eval task suites (registered lm-eval task names; the data comes from the hub)."""


def load_task_yaml(path: str | Path) -> dict[str, Any]:
    """An lm-eval task config from a YAML file, its relative `data_files` made absolute.

    lm-eval resolves relative `data_files` against the working directory; here they resolve
    against the YAML's own folder, so a task file works from wherever the run starts.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task file {path} not found")
    cfg = load_yaml(path)
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if files is not None:
        cfg["dataset_kwargs"]["data_files"] = _absolute(files, path.parent)
    return cfg


def _absolute(files: str | list | dict, base: Path) -> str | list | dict:
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    return str(base / files)


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


def task_specs(tasks: list[str], suites: list[str] = ()) -> list[str | dict]:
    """lm-eval task names as given, task YAML paths loaded (`load_task_yaml`), then the tasks of
    each named suite (`SUITES`)."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown task suite(s) {unknown}; known: {sorted(SUITES)}")
    named = [t for s in suites for t in SUITES[s] if t not in tasks]
    return [load_task_yaml(t) if t.endswith((".yaml", ".yml")) else t for t in [*tasks, *named]]


def task_manager_for(tasks: list[str | dict]) -> TaskManager:
    """A TaskManager that indexes lm-eval's built-in tasks (seconds) only when a name needs it;
    a name it does not know is refused here, before any model runs."""
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    unknown = [t for t in tasks if isinstance(t, str) and t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}: not registered with lm-eval {lm_eval.__version__} "
            "(list them with `lm-eval ls tasks`); give a registered name or the path of a task "
            "YAML file (configs/tasks/*.yaml)"
        )
    return manager


class DistributedHFLM(HFLM):
    """lm-eval's HFLM over an in-memory model that knows its rank in torch.distributed.

    lm-eval asks the model for `rank`, `world_size`, `all_gather`, `gather_object` and `barrier`
    to split requests over processes; HFLM answers them through Hugging Face Accelerate, which an
    in-memory model does not have, so here they go to torch.distributed directly. Under FSDP
    (`sharded`), generation runs with `synced_gpus` so that every rank keeps stepping until the
    longest generation on any rank is done.
    """

    def __init__(self, *args: Any, sharded: bool = False, **kwargs: Any) -> None:
        # One request per forward group: lm-eval's shared-context grouping could give the ranks
        # different numbers of forward passes.
        super().__init__(*args, logits_cache=False, **kwargs)
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        self.sharded = sharded

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        dist.barrier()

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.sharded:
            generation_kwargs["synced_gpus"] = True
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


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
    """
    if task_manager is None:
        task_manager = task_manager_for(tasks)
    was_training = model.training
    kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  add_bos_token=add_bos_token)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    lm = DistributedHFLM(**kwargs, sharded=sharded) if distributed else HFLM(**kwargs)
    py_state, np_state = random.getstate(), np.random.get_state()
    chat = [t for t in tasks if uses_chat_template(t)]
    if chat and not tokenizer.chat_template:
        raise ValueError(
            f"task(s) {[t['task'] for t in chat]} ask for the model's chat template (metadata.chat_template: "
            f"true) but tokenizer {tokenizer.name_or_path!r} has none: leave them out for a base model, "
            "or give the tokenizer a chat_template")
    groups = [(group, group is chat) for group in ([t for t in tasks if t not in chat], chat) if group]
    values: dict[str, float] = {}
    better: dict[str, bool] = {}
    try:
        for group, apply_chat in groups:  # lm-eval applies a chat template to all tasks of a call
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
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
        model.train(was_training)  # lm-eval calls model.eval()
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (values, better) if values else None


def uses_chat_template(task: str | dict) -> bool:
    """Whether a task's prompts go through the model's chat template: a task YAML asks for it
    with `metadata: {chat_template: true}` (an Instruct model's behaviour is measured as users
    meet it, in chat turns)."""
    return isinstance(task, dict) and bool(task.get("metadata", {}).get("chat_template", False))
