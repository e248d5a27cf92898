"""lm-eval on an in-memory model: task files, named suites, and requests split over processes.

`evaluate_lm` scores the model being trained with lm-eval. In a distributed run (DDP, FSDP) every
process calls it: lm-eval hands each rank its slice of the documents, pads the ranks' request
lists to equal length so each process runs the same number of forward passes (FSDP needs every
rank in every forward), and gathers the per-document scores to rank 0, where the metrics are
computed over all documents, as in a one-process run.

- `tasks`: which tasks (names, YAML files, suites), checked before any model runs;
- `run`: `evaluate_lm`, one progress line per evaluation;
- `hflm`: lm-eval's HFLM over the in-memory model (the only module that imports lm-eval at its
  top; `evaluate_lm` imports it when an evaluation runs, so importing this package is cheap).
"""

from .run import Evaluation, evaluate_lm
from .tasks import SUITES, load_task_yaml, task_manager_for, task_name, task_specs, uses_chat_template

__all__ = ["SUITES", "Evaluation", "evaluate_lm", "load_task_yaml", "task_manager_for", "task_name", "task_specs",
           "uses_chat_template"]
