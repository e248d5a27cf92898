"""The numbers a comparison of runs reports, measured from the base model and a baseline method.

All scores are measured relative to the base model (every fit's evaluation at fit start) and to
the `baseline` method (plain fine-tuning):
- forgetting recovered = (F_baseline - F_method) / F_baseline, with F the retained score's loss
  since the base (1: no forgetting, 0: as much as the baseline);
- gain kept = G_method / G_baseline, with G the downstream score's improvement over the base.
"""

from __future__ import annotations

import math
import statistics

from ..scores import METER
from .runs import Run

LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "byte_perplexity", "loss", "nll")
"""Metric name endings that are better lower, where the logs do not tell."""


def higher_is_better(runs: list[Run], metric: str, given: list[str]) -> bool:
    """The metric's direction: from `given`, else from the logged `forget/` (positive = worse)."""
    if metric in given:
        return True
    for run in runs:
        for ev, fg in zip(run.evals, run.forget):
            delta = ev.get(metric, 0.0) - run.evals[0].get(metric, 0.0)
            if metric in fg and abs(delta) > 1e-12:
                return fg[metric] * delta < 0
    if any(metric.endswith(s) for s in LOWER_IS_BETTER):
        return False
    raise ValueError(f"cfs report: cannot tell whether {metric!r} is better higher or lower (no "
                     f"forget/ values logged); list it in --higher_is_better if higher is better, "
                     f"or give a metric ending in one of {LOWER_IS_BETTER}")


def forgetting_recovered(ret: float, ft_ret: float, base_ret: float, sign: float = 1.0) -> float:
    """(F_ft - F) / F_ft, with F = loss of retained score since the base (sign: +1 lower is better)."""
    forgot_ft = sign * (ft_ret - base_ret)
    return (sign * (ft_ret - ret)) / forgot_ft if forgot_ft else math.nan


def gain_kept(down: float, ft_down: float, base_down: float, sign: float = 1.0) -> float:
    """G / G_ft, with G = improvement of the downstream score over the base (sign: +1 lower is better)."""
    gain_ft = sign * (base_down - ft_down)
    return (sign * (base_down - down)) / gain_ft if gain_ft else math.nan


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), NaNs left out."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _check_logged(runs: list[Run], metrics: tuple[str, ...]) -> None:
    for run in runs:
        for metric in metrics:
            if not run.evals or metric not in run.evals[-1]:
                logged = sorted(run.evals[-1]) if run.evals else []
                raise KeyError(f"cfs report: run {run.path} logged no {metric!r}; it logged {logged}")


def by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """The runs grouped by method, in the order the methods first appear."""
    methods: dict[str, list[Run]] = {}
    for run in runs:
        methods.setdefault(run.method, []).append(run)
    return methods


def _method_row(group: list[Run], pair: tuple[str, str], base: dict, ref: dict | None, sign: dict) -> dict:
    """One method's final scores (mean, std over its seeds) and, against `ref`, its ratios."""
    finals = [r.evals[-1] for r in group]
    row = {"runs": [str(r.path) for r in group], "seeds": len(group)}
    for key, metric in zip(("retained", "downstream"), pair):
        row[key], row[f"{key}_std"] = mean_std([f[metric] for f in finals])
    if ref is not None:
        retained, downstream = pair
        row["forgetting_recovered"], row["forgetting_recovered_std"] = mean_std(
            [forgetting_recovered(f[retained], ref[retained], base[retained], sign[retained]) for f in finals])
        row["gain_kept"], row["gain_kept_std"] = mean_std(
            [gain_kept(f[downstream], ref[downstream], base[downstream], sign[downstream]) for f in finals])
    alphas = [r.alpha for r in group if r.alpha is not None]
    if alphas:
        row["alpha"] = alphas
        row["alpha_chosen_on"] = sorted({m for r in group for m in r.chosen_on})
    return row


def summarize(runs: list[Run], retained: str, downstream: str, baseline: str | None,
              higher: list[str] = ()) -> dict:
    """Per method: final retained / downstream scores, forgetting recovered, gain kept (mean, std)."""
    pair = (retained, downstream)
    sign = {m: -1.0 if higher_is_better(runs, m, list(higher)) else 1.0 for m in pair}
    _check_logged(runs, pair)
    starts = start_evals(runs)
    base = {m: statistics.fmean(s[m] for s in starts) for m in pair}
    methods = by_method(runs)
    if baseline is not None and baseline not in methods:
        raise ValueError(f"cfs report: the baseline method {baseline!r} is not among the runs "
                         f"({sorted(methods)}); name one with --baseline, or --baseline null")
    ref = None if baseline is None else {
        m: statistics.fmean(r.evals[-1][m] for r in methods[baseline]) for m in pair}
    return {"retained_metric": retained, "downstream_metric": downstream, "baseline": baseline,
            "higher_is_better": {m: sign[m] < 0 for m in sign}, "base": base,
            "methods": {name: _method_row(group, pair, base, ref, sign) for name, group in methods.items()}}


def start_evals(runs: list[Run]) -> list[dict[str, float]]:
    """The evaluations of the base model: every fit's first one, when taken at fit start."""
    starts = [r.evals[0] for r in runs if r.is_fit and r.evals and r.epochs[0] == 0.0]
    if not starts:
        raise ValueError("cfs report: no fit among the runs evaluated the base model at fit start "
                         "(RetainedEval on_fit_start: true); the report measures every method from it")
    return starts


def summarize_also(runs: list[Run], metrics: list[str], baseline: str | None) -> dict:
    """Further metrics beside the table's pair: each one's base score (fit start, mean over runs),
    every method's final mean and std, and the baseline's change from the base in units of its
    seed spread (`change_in_std`: how clearly the baseline moved; inf when the seeds agree)."""
    starts = start_evals(runs)
    out = {}
    for metric in metrics:
        missing = [str(r.path) for r in runs if not r.evals or metric not in r.evals[-1]]
        if missing:
            raise KeyError(f"cfs report: {metric!r} (in `also`) was not logged by {missing[0]}")
        entry = {"base": statistics.fmean(start[metric] for start in starts),
                 "methods": {name: mean_std([r.evals[-1][metric] for r in group])
                             for name, group in by_method(runs).items()}}
        if baseline in entry["methods"]:
            mean, std = entry["methods"][baseline]
            entry["change_in_std"] = abs(mean - entry["base"]) / std if std else math.inf
        out[metric] = entry
    return out


def summarize_items(runs: list[Run]) -> dict[str, dict[str, list[float]]]:
    """Per-item forgetting (`scores.item_changes`) at each method's last evaluation:
    `<task>/<metric>/<change> -> {method: [mean, std, runs]}` over the runs that logged it."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, group in by_method(runs).items():
        for key in dict.fromkeys(k for run in group for k in run.items):
            values = [run.items[key] for run in group if key in run.items]
            out.setdefault(key, {})[name] = [*mean_std(values), len(values)]
    return out


def meter_summary(runs: list[Run], retained: str) -> dict[str, dict]:
    """Per meter key logged by any run: each run's last value beside its final retained score
    (`points`: [meter, retained, method]) and their Pearson correlation over the runs, when they
    come from at least two methods (the meter is to tell methods apart; the seeds of one method
    alone give a correlation of their noise)."""
    found = {}
    for key in METER:
        points = [[run.curves[key][-1][1], run.evals[-1][retained], run.method] for run in runs
                  if key in run.curves and run.evals and retained in run.evals[-1]]
        if points:
            across = len({p[2] for p in points}) >= 2
            found[key] = {"points": points, "pearson_r": _pearson([p[0] for p in points], [p[1] for p in points])
                          if across else None}
    return found


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    """The correlation of two equally long lists; None for fewer than 3 points or no spread."""
    try:
        return statistics.correlation(xs, ys) if len(xs) >= 3 else None
    except statistics.StatisticsError:  # a constant list
        return None
