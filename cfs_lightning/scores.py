"""Where every metric is named, and where a run's scores are written.

Keys by path (what the loggers, `cfs report`, `cfs continual` and WiSE-FT read):

- `train/loss`, `train/task_loss` (the task's NLL whatever the objective), `train/task_<name>`
  (another task loss's value), `train/reg/<name>` (each regularizer's term);
- `val/task_loss`, `val/replay_nll` (nats per token) and the forgetting meter `val/task_kl`,
  `val/replay_kl` (KL(p_base || p_theta), nats per token); `test/...` alike;
- `eval/<task>/<metric>` (lm-eval's scores) and `forget/<task>/<metric>` (their change since the
  first evaluation, positive: worse).

A run's scores are one JSON file in its folder (`SCORES_FILE`): a list of evaluations, each a
dict of `eval/...` and `forget/...` values with where it was taken (`epoch`, `step`, or a WiSE-FT
`alpha`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import write_text
from .streams import REPLAY, TASK

VAL_KEYS = {TASK: "task_loss", REPLAY: "replay_nll"}
"""Validation key per stream, under `val/` or `test/` (nats per token)."""
METER_KEYS = {TASK: "task_kl", REPLAY: "replay_kl"}
"""The forgetting meter's key per stream, under `val/` or `test/`."""
METER = tuple(f"val/{k}" for k in METER_KEYS.values())
"""The forgetting meter's validation keys."""
CURVES = (*(f"val/{k}" for k in (VAL_KEYS[REPLAY], VAL_KEYS[TASK])), *METER)
"""The validation keys a report draws per epoch."""
EVAL, FORGET = "eval/", "forget/"
"""Prefixes of lm-eval's scores and of their change since the first evaluation."""

SCORES_FILE = "retained_eval.json"
"""A run's evaluations, in its log folder."""


def scored(values: dict[str, float], baseline: dict[str, float], better: dict[str, bool]) -> dict[str, float]:
    """One evaluation's keys: `eval/<k>` for each value, then `forget/<k>`, its change since
    `baseline` signed so that positive means worse (`better[k]`: higher is better)."""
    keys = {f"{EVAL}{k}": v for k, v in values.items()}
    return keys | {f"{FORGET}{k}": (baseline[k] - v if better[k] else v - baseline[k]) for k, v in values.items()}


def eval_scores(row: dict[str, Any], prefix: str = EVAL) -> dict[str, float]:
    """`<task>/<metric> -> value` of one evaluation, read from its `eval/` (or `forget/`) keys."""
    return {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}


def write_scores(folder: str | Path, evaluations: list[dict[str, Any]]) -> Path:
    """Write a run's evaluations (atomically) to `<folder>/SCORES_FILE`."""
    path = Path(folder) / SCORES_FILE
    write_text(path, json.dumps(evaluations, indent=2) + "\n")
    return path


def read_scores(folder: str | Path) -> list[dict[str, Any]]:
    """A run's evaluations as `write_scores` wrote them."""
    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {SCORES_FILE}: the run wrote no scores (a fit "
                                "writes them with a RetainedEval callback)")
    return json.loads(path.read_text())
