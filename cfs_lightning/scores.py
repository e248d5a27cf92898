"""Where every metric is named, and where a run's scores are written.

Keys by path (what the loggers, `cfs report`, `cfs continual` and WiSE-FT read):

- `train/loss`, `train/task_loss` (the task's NLL whatever the objective), `train/task_<name>`
  (another task loss's value), `train/reg/<name>` (each regularizer's term);
- `val/task_loss`, `val/replay_nll` (nats per token) and the forgetting meter `val/task_kl`,
  `val/replay_kl` (KL(p_base || p_theta), nats per token); `test/...` alike;
- `eval/<task>/<metric>` (lm-eval's scores) and `forget/<task>/<metric>` (their change since the
  first evaluation, positive: worse);
- `items/<task>/<metric>/<change>`: per-item forgetting of a metric that scores each document 0 or
  1 (`item_changes`).

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
EVAL, FORGET, ITEMS = "eval/", "forget/", "items/"
"""Prefixes of lm-eval's scores, of their change since the first evaluation, and of the per-item
changes since it."""
ITEM_CHANGES = ("forgotten", "gained", "forgotten_adjusted", "gained_adjusted")
"""What `item_changes` gives per metric."""

SCORES_FILE = "retained_eval.json"
"""A run's evaluations, in its log folder."""


def scored(values: dict[str, float], baseline: dict[str, float], better: dict[str, bool]) -> dict[str, float]:
    """One evaluation's keys: `eval/<k>` for each value, then `forget/<k>`, its change since
    `baseline` signed so that positive means worse (`better[k]`: higher is better)."""
    keys = {f"{EVAL}{k}": v for k, v in values.items()}
    return keys | {f"{FORGET}{k}": (baseline[k] - v if better[k] else v - baseline[k]) for k, v in values.items()}


def item_changes(start: dict[str, dict[str, list[float]]],
                 now: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Per-item forgetting (arXiv 2510.17776) of each metric scored 0 or 1 per document, over the
    documents scored both times: `items/<task>/<metric>/forgotten`, the share right at `start` and
    wrong `now` (1 -> 0), and `gained`, the share wrong then and right now (0 -> 1, backward
    transfer).

    `*_adjusted` take out what guessing explains, under the response model of the paper's
    chance-adjusted variants: on each item the model knows the answer or picks one of k choices at
    random (chance c = 1/k; 0 where nothing is guessed, and then they equal the raw shares). With
    a0, a1 the accuracies then and now, the shares answered by guessing are u_i = (1 - a_i) /
    (1 - c); we take the items guessed both times to be min(u0, u1) (those known now were known
    then, or the reverse) and each such item flips either way with probability c (1 - c). What
    is left of a share, divided by 1 - c (a lost item guessed right again shows no flip), estimates
    the share of items whose knowledge was lost (gained). The estimate is not clipped at 0.

    Args:
        start, now: `<task>/<metric> -> {doc_id: [score (0 or 1), chance]}`, as the evaluation
            gives them (`evaluation.evaluate_lm(items=True)`).
    """
    out = {}
    for key, before in start.items():
        docs = sorted(set(before) & set(now.get(key, {})))
        if not docs:
            continue
        pairs = [(before[d][0], now[key][d][0]) for d in docs]
        n, chance = len(docs), sum(before[d][1] for d in docs) / len(docs)
        if chance >= 1:  # one choice per document: nothing to get right or wrong
            continue
        forgotten = sum(a > b for a, b in pairs) / n
        gained = sum(a < b for a, b in pairs) / n
        a0, a1 = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
        guessed = min(1.0, (1 - a0) / (1 - chance), (1 - a1) / (1 - chance))
        flips = guessed * chance * (1 - chance)
        for change, value in (("forgotten", forgotten), ("gained", gained),
                              ("forgotten_adjusted", (forgotten - flips) / (1 - chance)),
                              ("gained_adjusted", (gained - flips) / (1 - chance))):
            out[f"{ITEMS}{key}/{change}"] = value
    return out


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
