"""A run's folder: finding runs, reading their scores and logs, and the record of a finished step.

A run is a folder holding any of: the run's scores (`scores.SCORES_FILE`, written by
`RetainedEval` during a fit and by `cfs interpolate` for its chosen alpha), a Lightning
`metrics.csv` (CSVLogger) or TensorBoard `events.out.tfevents.*` files. Runs are grouped into
methods by folder name: a folder named `seed<k>` (or `version_<k>`) is one seed of the method
named by its parent, so `runs/study/methods/<method>/seed<k>` is one seed of `<method>`.

A step of `cfs study` or `cfs continual` that finished writes `done.json` into its folder (its
settings and the minutes it took); a rerun skips it, and refuses it if the settings changed.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import write_text
from ..scores import CURVES, EVAL, FORGET, ITEMS, SCORES_FILE, eval_scores, read_scores

DONE = "done.json"
"""The record a finished step leaves in its folder."""
SWEEP = "wise_ft.json"
"""A WiSE-FT run's whole sweep (every alpha's scores), beside its scores."""
_GROUPING = re.compile(r"(seed[_-]?\d+|version_\d+|lightning_logs)")


@dataclass
class Run:
    """One run's evaluations: `evals[i]` maps `<task>/<metric>` to a value at `epochs[i]` epochs
    completed (0: fit start, the base model)."""

    path: Path
    method: str
    seed: str
    epochs: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    forget: list[dict[str, float]] = field(default_factory=list)
    """`forget/<task>/<metric>` beside each evaluation, when logged (it tells the metric's direction)."""
    items: dict[str, float] = field(default_factory=dict)
    """The last evaluation's per-item changes, `<task>/<metric>/<change>` (`scores.item_changes`), when logged."""
    alpha: float | None = None
    """WiSE-FT: the alpha whose scores are the run's last evaluation (the first is alpha 0)."""
    chosen_on: list[str] = field(default_factory=list)
    """WiSE-FT: the validation metrics its alpha was chosen on."""
    sweep: list[dict[str, float]] | None = None
    """WiSE-FT: every alpha's scores, for the trade-off plot."""

    @property
    def is_fit(self) -> bool:
        """Whether the run trained (its first evaluation is then the base model at fit start)."""
        return self.alpha is None


def is_run(path: Path) -> bool:
    return path.is_dir() and (any((path / name).is_file() for name in (SCORES_FILE, "metrics.csv"))
                              or any(path.glob("events.out.tfevents.*")))


def find_runs(paths: list[str]) -> list[Path]:
    """Each path if it is a run, else every run below it (in name order)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"cfs report: {p} does not exist")
        runs = [p] if is_run(p) else sorted(d for d in p.rglob("*") if is_run(d))
        if not runs:
            raise FileNotFoundError(
                f"cfs report: no run logs in or under {p}: expected {SCORES_FILE}, metrics.csv or "
                "events.out.tfevents.* (TensorBoard)")
        found += [r for r in runs if r not in found]
    return found


def method_and_seed(path: Path) -> tuple[str, str]:
    """`.../<method>/seed1` -> (method, seed1); `.../<method>/lightning_logs/version_0` -> (method, version_0)."""
    seed, part = "", path
    while _GROUPING.fullmatch(part.name) and part.parent != part:
        if not seed and part.name != "lightning_logs":
            seed = part.name
        part = part.parent
    return part.name, seed


def number(text: str) -> float | None:
    """`text` as a float; None when it is not one."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_csv_metrics(path: Path) -> list[dict[str, float]]:
    """A CSVLogger's `metrics.csv` as rows of the numbers logged in them (empty cells left out)."""
    with path.open(newline="") as f:
        return [{k: v for k, v in ((k, number(x)) for k, x in row.items()) if v is not None}
                for row in csv.DictReader(f)]


def _read_tensorboard(folder: Path) -> list[dict[str, float]]:
    """TensorBoard scalars as rows {step, tag: value} (one row per step)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise ImportError(f"cfs report: reading the TensorBoard logs in {folder} needs the tensorboard "
                          "package (pip install tensorboard)") from e
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            rows.setdefault(event.step, {"step": float(event.step)})[tag] = float(event.value)
    return [rows[s] for s in sorted(rows)]


def _epochs_completed(rows: list[dict[str, float]], step: float) -> float:
    """Epochs finished when an evaluation was logged at `step`: training rows carry the epoch."""
    if step == 0:
        return 0.0
    epochs = [r["epoch"] for r in rows if "epoch" in r and r.get("step", math.inf) <= step]
    return max(epochs) + 1 if epochs else step


def load_run(path: Path) -> Run:
    """A run's evaluations (its scores file, else the `eval/` rows of its logs) and validation curves."""
    run = Run(path, *method_and_seed(path))
    rows = read_csv_metrics(path / "metrics.csv") if (path / "metrics.csv").is_file() else []
    if not rows and any(path.glob("events.out.tfevents.*")):
        rows = _read_tensorboard(path)
    if (path / SCORES_FILE).is_file():
        history = read_scores(path)
        run.epochs = [0.0 if h.get("step", 0) == 0 else h["epoch"] + 1.0 for h in history]
    else:
        history = [r for r in rows if any(k.startswith(EVAL) for k in r)]
        run.epochs = [_epochs_completed(rows, h.get("step", 0)) for h in history]
    run.evals = [eval_scores(h) for h in history]
    run.forget = [eval_scores(h, FORGET) for h in history]
    run.items = eval_scores(history[-1], ITEMS) if history else {}
    if history and "alpha" in history[-1]:
        run.alpha, run.chosen_on = history[-1]["alpha"], history[-1].get("chosen_on", [])
        if (path / SWEEP).is_file():
            run.sweep = json.loads((path / SWEEP).read_text())["rows"]
    for key in CURVES:
        points = [(r["epoch"] + 1.0 if "epoch" in r else _epochs_completed(rows, r["step"]), r[key])
                  for r in rows if key in r]
        if points:
            run.curves[key] = points
    return run


def finished(folder: Path, **settings: Any) -> dict[str, Any] | None:
    """The record of a step finished in `folder` (`mark_done`), or None when it did not finish. A
    step finished with other `settings` is refused, not mixed into the results."""
    done = folder / DONE
    if not done.is_file():
        return None
    saved = json.loads(done.read_text())
    changed = [k for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"{folder} was finished with other settings ({', '.join(changed)}: "
                         f"{saved.get(changed[0])!r}, now {settings[changed[0]]!r}); delete that folder to "
                         "redo it with the new settings, or choose another output_dir")
    return saved


def mark_done(folder: Path, started: float, **record: Any) -> dict[str, Any]:
    """Write `folder`'s record of a finished step: `record` and the minutes since `started`
    (a `time.perf_counter()` reading)."""
    record = {**record, "minutes": (time.perf_counter() - started) / 60}
    write_text(folder / DONE, json.dumps(record, indent=2) + "\n")
    return record
