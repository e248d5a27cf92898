"""Which lm-eval tasks to run: registered names, task YAML files and named suites, checked before
any model runs.

lm-eval itself is imported inside the functions that need it: importing this module (as every
`cfs fit` does, through its callbacks) costs nothing when no evaluation is configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

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
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's YAML dialect (`!function` tags)

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


def task_specs(tasks: list[str], suites: list[str] = ()) -> list[str | dict]:
    """lm-eval task names as given, task YAML paths loaded (`load_task_yaml`), then the tasks of
    each named suite (`SUITES`)."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown task suite(s) {unknown}; known: {sorted(SUITES)}")
    named = [t for s in suites for t in SUITES[s] if t not in tasks]
    return [load_task_yaml(t) if t.endswith((".yaml", ".yml")) else t for t in [*tasks, *named]]


def task_name(task: str | dict) -> str:
    """A task's name: a registered name as given, a task YAML's `task`."""
    return task["task"] if isinstance(task, dict) else task


def task_manager_for(tasks: list[str | dict]) -> TaskManager:
    """A TaskManager that indexes lm-eval's built-in tasks (seconds) only when a name needs it;
    a name it does not know is refused here, before any model runs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    unknown = [t for t in tasks if isinstance(t, str) and t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}: not registered with lm-eval {lm_eval.__version__} "
            "(list them with `lm-eval ls tasks`); give a registered name or the path of a task "
            "YAML file (configs/tasks/*.yaml)"
        )
    return manager


def uses_chat_template(task: str | dict) -> bool:
    """Whether a task's prompts go through the model's chat template: a task YAML asks for it
    with `metadata: {chat_template: true}` (an Instruct model's behaviour is measured as users
    meet it, in chat turns)."""
    return isinstance(task, dict) and bool(task.get("metadata", {}).get("chat_template", False))
