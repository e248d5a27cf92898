"""`cfs report`: the comparison of a set of runs, from their logs, as a markdown table and plots.

A run is a folder holding any of: `retained_eval.json` (the `RetainedEval` callback's history),
a Lightning `metrics.csv` (CSVLogger), TensorBoard `events.out.tfevents.*` files, or `wise_ft.json`
(`cfs interpolate`; the run is its best alpha). Runs are grouped into methods by folder name: a
folder named `seed<k>` (or `version_<k>`) is one seed of the method named by its parent, so
`runs/study/methods/<method>/seed<k>` gives mean ± std over seeds.

All scores are measured relative to the base model (every fit's evaluation at fit start) and to
the `baseline` method (plain fine-tuning):
- forgetting recovered = (F_baseline - F_method) / F_baseline, with F the retained score's loss
  since the base (1: no forgetting, 0: as much as the baseline);
- gain kept = G_method / G_baseline, with G the downstream score's improvement over the base.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_file

METER = ("val/replay_kl", "val/task_kl")
"""The forgetting meter, KL(p_base || p_theta) per token at every validation (training/meter.py)."""
CURVES = ("val/replay_nll", "val/task_loss", *METER)
_GROUPING = re.compile(r"(seed[_-]?\d+|version_\d+|lightning_logs)")


@dataclass
class Run:
    """One run's evaluations: `evals[i]` maps `<task>/<metric>` (and `val/...`) to a value at
    `epochs[i]` epochs completed (0: fit start, the base model)."""

    path: Path
    method: str
    seed: str
    epochs: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    forget: list[dict[str, float]] = field(default_factory=list)
    """`forget/<task>/<metric>` beside each evaluation, when logged (it tells the metric's direction)."""
    sweep: list[dict[str, float]] | None = None
    """WiSE-FT: one row per alpha."""
    select_on: dict[str, str] | None = None
    """WiSE-FT: the validation metrics its alpha is chosen on (`wise_ft.AlphaSelection`)."""
    alpha: float | None = None


def is_run(path: Path) -> bool:
    return path.is_dir() and (
        any((path / name).is_file() for name in ("retained_eval.json", "metrics.csv", "wise_ft.json"))
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
                f"cfs report: no run logs in or under {p}: expected retained_eval.json, metrics.csv, "
                "events.out.tfevents.* (TensorBoard) or wise_ft.json")
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


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_csv_metrics(path: Path) -> list[dict[str, float]]:
    """A CSVLogger's `metrics.csv` as rows of the numbers logged in them (empty cells left out)."""
    with path.open(newline="") as f:
        return [{k: v for k, v in ((k, _number(x)) for k, x in row.items()) if v is not None}
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
    method, seed = method_and_seed(path)
    run = Run(path, method, seed)
    if (path / "wise_ft.json").is_file():
        sweep = json.loads((path / "wise_ft.json").read_text())
        run.sweep, run.select_on = (sweep, None) if isinstance(sweep, list) else (sweep["rows"], sweep["select_on"])
        return run
    rows = read_csv_metrics(path / "metrics.csv") if (path / "metrics.csv").is_file() else []
    if not rows and any(path.glob("events.out.tfevents.*")):
        rows = _read_tensorboard(path)
    if (path / "retained_eval.json").is_file():
        history = json.loads((path / "retained_eval.json").read_text())
        for h in history:
            run.epochs.append(0.0 if h["step"] == 0 else h["epoch"] + 1.0)
    else:
        history = [r for r in rows if any(k.startswith("eval/") for k in r)]
        run.epochs = [_epochs_completed(rows, h.get("step", 0)) for h in history]
    for h in history:
        run.evals.append({k[len("eval/"):]: v for k, v in h.items() if k.startswith("eval/")})
        run.forget.append({k[len("forget/"):]: v for k, v in h.items() if k.startswith("forget/")})
    for key in CURVES:
        points = [(r["epoch"] + 1.0 if "epoch" in r else _epochs_completed(rows, r["step"]), r[key])
                  for r in rows if key in r]
        if points:
            run.curves[key] = points
    return run


def higher_is_better(runs: list[Run], metric: str, given: list[str]) -> bool:
    """The metric's direction: from `given`, else from the logged `forget/` (positive = worse)."""
    if metric in given:
        return True
    for run in runs:
        for ev, fg in zip(run.evals, run.forget):
            delta = ev.get(metric, 0.0) - run.evals[0].get(metric, 0.0)
            if metric in fg and abs(delta) > 1e-12:
                return fg[metric] * delta < 0
    lower = ("perplexity", "bits_per_byte", "byte_perplexity", "loss", "nll")
    if any(metric.endswith(s) for s in lower):
        return False
    raise ValueError(f"cfs report: cannot tell whether {metric!r} is better higher or lower (no "
                     f"forget/ values logged); list it in --higher_is_better if higher is better, "
                     f"or give a metric ending in one of {lower}")


def _best_alpha(sweep: list[dict[str, float]], retained: str, downstream: str, sign: dict[str, float]) -> dict:
    """The alpha with the most forgetting recovered + gain kept relative to its own ends (0, 1),
    on the `retained` and `downstream` metrics given (the validation ones)."""
    by_alpha = {r["alpha"]: r for r in sweep}
    if 0.0 not in by_alpha or 1.0 not in by_alpha:
        raise ValueError("cfs report: a wise_ft.json sweep needs alphas 0 and 1 to choose the best alpha; "
                         f"it has {sorted(by_alpha)}")
    base, ft = by_alpha[0.0], by_alpha[1.0]

    def score(r):
        return forgetting_recovered(r[retained], ft[retained], base[retained], sign[retained]) + gain_kept(
            r[downstream], ft[downstream], base[downstream], sign[downstream])

    return max(sweep, key=score)


def forgetting_recovered(ret: float, ft_ret: float, base_ret: float, sign: float = 1.0) -> float:
    """(F_ft - F) / F_ft, with F = loss of retained score since the base (sign: +1 lower is better)."""
    forgot_ft = sign * (ft_ret - base_ret)
    return (sign * (ft_ret - ret)) / forgot_ft if forgot_ft else math.nan


def gain_kept(down: float, ft_down: float, base_down: float, sign: float = 1.0) -> float:
    """G / G_ft, with G = improvement of the downstream score over the base (sign: +1 lower is better)."""
    gain_ft = sign * (base_down - ft_down)
    return (sign * (base_down - down)) / gain_ft if gain_ft else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run], retained: str, downstream: str, baseline: str | None,
              higher: list[str] = ()) -> dict:
    """Per method: final retained / downstream scores, forgetting recovered, gain kept (mean, std)."""
    sign = {m: -1.0 if higher_is_better(runs, m, list(higher)) else 1.0 for m in (retained, downstream)}
    fits = [r for r in runs if r.sweep is None]
    if not fits:
        raise ValueError("cfs report: no fit among the runs; the base model's scores come from a fit's "
                         "evaluation at fit start (RetainedEval on_fit_start)")
    for run in runs:
        if run.sweep is not None:
            if run.select_on is None:
                raise ValueError(
                    f"cfs report: {run.path / 'wise_ft.json'} has no validation scores to choose its alpha "
                    "on (it was written without select_on), and choosing it on the scores the table "
                    "reports would flatter it; rerun `cfs interpolate` with select_on (validation tasks "
                    "such as configs/tasks/*_val.yaml; the study's wise_ft.select_on)")
            chosen_on = (run.select_on["retained"], run.select_on["downstream"])
            missing = [m for m in (retained, downstream, *chosen_on) if any(m not in row for row in run.sweep)]
            if missing:
                raise KeyError(f"cfs report: run {run.path} logged no {missing[0]!r}; it logged "
                               f"{sorted(run.sweep[0])}")
            best = _best_alpha(run.sweep, *chosen_on, {chosen_on[0]: sign[retained], chosen_on[1]: sign[downstream]})
            run.alpha = best["alpha"]
            run.evals = [{k: v for k, v in r.items() if k != "alpha"} for r in (run.sweep[0], best)]
        for metric in (retained, downstream):
            if not run.evals or metric not in run.evals[-1]:
                logged = sorted(run.evals[-1]) if run.evals else []
                raise KeyError(f"cfs report: run {run.path} logged no {metric!r}; it logged {logged}")
    starts = _start_evals(fits)
    base = {m: statistics.fmean(s[m] for s in starts) for m in (retained, downstream)}
    methods: dict[str, list[Run]] = {}
    for run in runs:
        methods.setdefault(run.method, []).append(run)
    if baseline is not None and baseline not in methods:
        raise ValueError(f"cfs report: the baseline method {baseline!r} is not among the runs "
                         f"({sorted(methods)}); name one with --baseline, or --baseline null")
    ref = None
    if baseline is not None:
        ref = {m: statistics.fmean(r.evals[-1][m] for r in methods[baseline]) for m in (retained, downstream)}
    out: dict = {"retained_metric": retained, "downstream_metric": downstream, "baseline": baseline,
                 "higher_is_better": {m: sign[m] < 0 for m in sign}, "base": base, "methods": {}}
    for name, group in methods.items():
        finals = [r.evals[-1] for r in group]
        row = {"runs": [str(r.path) for r in group], "seeds": len(group)}
        for key, metric in (("retained", retained), ("downstream", downstream)):
            row[key], row[f"{key}_std"] = _mean_std([f[metric] for f in finals])
        if ref is not None:
            row["forgetting_recovered"], row["forgetting_recovered_std"] = _mean_std(
                [forgetting_recovered(f[retained], ref[retained], base[retained], sign[retained]) for f in finals])
            row["gain_kept"], row["gain_kept_std"] = _mean_std(
                [gain_kept(f[downstream], ref[downstream], base[downstream], sign[downstream]) for f in finals])
        alphas = [r.alpha for r in group if r.alpha is not None]
        if alphas:
            row["alpha"] = alphas
            row["alpha_chosen_on"] = sorted({r.select_on[k] for r in group if r.select_on for k in ("retained", "downstream")})
        out["methods"][name] = row
    return out


def _start_evals(runs: list[Run]) -> list[dict[str, float]]:
    """The evaluations of the base model: every fit's first one, when taken at fit start."""
    starts = [r.evals[0] for r in runs if r.sweep is None and r.evals and r.epochs[0] == 0.0]
    if not starts:
        raise ValueError("cfs report: no run evaluated the base model at fit start (RetainedEval "
                         "on_fit_start: true); the report measures every method from it")
    return starts


def summarize_also(runs: list[Run], metrics: list[str], baseline: str | None) -> dict:
    """Further metrics beside the table's pair: each one's base score (fit start, mean over runs),
    every method's final mean and std, and the baseline's change from the base in units of its
    seed spread (`change_in_std`: how clearly the baseline moved; inf when the seeds agree)."""
    starts = _start_evals(runs)
    out = {}
    for metric in metrics:
        missing = [str(r.path) for r in runs if not r.evals or metric not in r.evals[-1]]
        if missing:
            raise KeyError(f"cfs report: {metric!r} (in `also`) was not logged by {missing[0]}")
        entry = {"base": statistics.fmean(start[metric] for start in starts), "methods": {}}
        by_method: dict[str, list[float]] = {}
        for run in runs:
            by_method.setdefault(run.method, []).append(run.evals[-1][metric])
        for name, values in by_method.items():
            entry["methods"][name] = _mean_std(values)
        if baseline in by_method:
            mean, std = entry["methods"][baseline]
            entry["change_in_std"] = abs(mean - entry["base"]) / std if std else math.inf
        out[metric] = entry
    return out


def also_markdown(s: dict) -> str:
    """The second table: every `also` metric per method, and the baseline's change against its spread."""
    also = s.get("also") or {}
    if not also:
        return ""
    metrics = list(also)
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|",
             "| base model | " + " | ".join(f"{also[m]['base']:.4f}" for m in metrics) + " |"]
    for name in next(iter(also.values()))["methods"]:
        lines.append(f"| {name} | " + " | ".join(_pm(*also[m]["methods"][name], ".4f") for m in metrics) + " |")
    if s["baseline"] is not None and "change_in_std" in also[metrics[0]]:
        lines += ["", f"{s['baseline']}'s change from the base model, in standard deviations of its seeds: "
                  + ", ".join(f"{m} {also[m]['change_in_std']:.1f}" for m in metrics) + "."]
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:{fmt}}"
    text = text.lstrip("-") if float(text) == 0 else text  # no "-0"
    return f"{text} ± {std:{fmt}}" if std else text


def to_markdown(s: dict) -> str:
    better = {True: "higher is better", False: "lower is better"}
    ret, down = s["retained_metric"], s["downstream_metric"]
    head = (f"| method | seeds | retained: {ret} ({better[s['higher_is_better'][ret]]}) "
            f"| downstream: {down} ({better[s['higher_is_better'][down]]}) |")
    cols = 4
    if s["baseline"] is not None:
        head += " forgetting recovered | gain kept |"
        cols += 2
    lines = [head, "|---" * cols + "|",
             f"| base model | - | {s['base'][ret]:.4f} | {s['base'][down]:.4f} |" + (" 100% | 0% |" if cols > 4 else "")]
    for name, r in s["methods"].items():
        label = name + (f" (α = {', '.join(f'{a:g}' for a in sorted(set(r['alpha'])))})" if "alpha" in r else "")
        line = (f"| {label} | {r['seeds']} | {_pm(r['retained'], r['retained_std'], '.4f')} "
                f"| {_pm(r['downstream'], r['downstream_std'], '.4f')} |")
        if cols > 4:
            line += (f" {_pm(100 * r['forgetting_recovered'], 100 * r['forgetting_recovered_std'], '.0f')}% "
                     f"| {_pm(100 * r['gain_kept'], 100 * r['gain_kept_std'], '.0f')}% |")
        lines.append(line)
    lines.append("")
    lines.append("Mean ± standard deviation over seeds (one seed: no ±). The base model row is the "
                 "evaluation at fit start.")
    if s["baseline"] is not None:
        lines.append(f"Forgetting recovered = (F_{s['baseline']} − F) / F_{s['baseline']} and gain kept = "
                     f"G / G_{s['baseline']}, where F is the retained score's loss since the base model and "
                     f"G the downstream score's improvement over it, against the mean of the "
                     f"{s['baseline']!r} runs: 100% forgetting recovered is no forgetting at all.")
    for name, r in s["methods"].items():
        if "alpha" in r:
            lines.append(f"{name}: α is chosen per seed, by the same forgetting recovered + gain kept, on "
                         f"validation documents that the table's tasks never see ("
                         + ", ".join(f"`{k}`" for k in r["alpha_chosen_on"])
                         + "); the row gives that α's scores on the table's tasks.")
    for key, m in s.get("meter", {}).items():
        r = "n/a" if m["pearson_r"] is None else f"{m['pearson_r']:.2f}"
        methods = len({p[2] for p in m["points"]})
        lines.append(f"Forgetting meter: `{key}` at the last validation against the final retained "
                     f"score, over {len(m['points'])} runs of {methods} method{'s' * (methods > 1)}: "
                     f"Pearson r = {r} (`meter.png`; computed across at least two methods).")
    return "\n".join(lines) + "\n"


def _plots(runs: list[Run], s: dict, out: Path, sweep_label: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ret, down = s["retained_metric"], s["downstream_metric"]
    names = list(s["methods"])
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # tab20's strong colours first
    colours = {n: plt.get_cmap("tab20")(order[i % 20]) for i, n in enumerate(names)}
    written = []

    def save(fig, name):
        fig.tight_layout()
        with atomic_file(out / name) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written.append(name)

    # 1. the trade-off: retained against downstream, the base model marked
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.plot(s["base"][ret], s["base"][down], "k*", markersize=16, label="base model")
    for name, r in s["methods"].items():
        ax.errorbar(r["retained"], r["downstream"], xerr=r["retained_std"], yerr=r["downstream_std"],
                    fmt="o", color=colours[name], capsize=3, label=name)
        ax.annotate(name, (r["retained"], r["downstream"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    for run in runs:  # a WiSE-FT sweep: its whole path, dashed
        if run.sweep is not None:
            ax.plot([p[ret] for p in run.sweep], [p[down] for p in run.sweep], "--", lw=0.8,
                    color=colours[run.method], alpha=0.6)
    hib = s["higher_is_better"]
    ax.set_xlabel(f"retained: {ret} ({'higher' if hib[ret] else 'lower'} is better)")
    ax.set_ylabel(f"downstream: {down} ({'higher' if hib[down] else 'lower'} is better)")
    ax.set_title("Forgetting vs learning: the best corner is "
                 f"{'right' if hib[ret] else 'left'}-{'top' if hib[down] else 'bottom'}")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "tradeoff.png")

    # 2. per-epoch curves, mean over seeds with a ± std band
    panels = [(ret, "retained"), (down, "downstream")] + [
        (k, k) for k in CURVES if any(k in r.curves for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name in names:
            series = []
            for run in (r for r in runs if r.method == name and r.sweep is None):
                if key in CURVES:
                    series.append(dict(run.curves.get(key, [])))
                else:
                    series.append({e: v[key] for e, v in zip(run.epochs, run.evals) if key in v})
            xs = sorted({x for ser in series for x in ser})
            if not xs:
                continue
            stats = [_mean_std([ser[x] for ser in series if x in ser]) for x in xs]
            mean = [m for m, _ in stats]
            ax.plot(xs, mean, "o-", ms=3, color=colours[name], label=name)
            ax.fill_between(xs, [m - d for m, d in stats], [m + d for m, d in stats], color=colours[name],
                            alpha=0.15, lw=0)
        ax.set_title(f"{title}: {key}" if title != key else key, fontsize=9)
        ax.set_xlabel("epochs completed (0: base model)")
    axes[0][0].legend(fontsize=6, ncol=2)
    save(fig, "curves.png")

    # 3. forgetting recovered and gain kept per method, relative to the baseline
    if s["baseline"] is not None:
        shown = [n for n in names if n != s["baseline"]]
        fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(shown) + 1.5))
        ys = range(len(shown))
        for offset, key, label in ((-0.2, "forgetting_recovered", "forgetting recovered"),
                                   (0.2, "gain_kept", "downstream gain kept")):
            ax.barh([y + offset for y in ys], [100 * s["methods"][n][key] for n in shown], height=0.4,
                    xerr=[100 * s["methods"][n][f"{key}_std"] for n in shown], capsize=2, label=label)
        ax.axvline(100, color="k", lw=0.6, ls=":")
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks(list(ys), shown, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"% relative to {s['baseline']} (forgetting recovered: 100 = none forgotten; "
                      "gain kept: 100 = as much learned)", fontsize=8)
        ax.legend(fontsize=8)
        save(fig, "recovered.png")

    # 4. an ablation: methods named <series>@<value> plotted against the value
    series: dict[str, list[tuple[float, str]]] = {}
    for n in names:
        prefix, _, value = n.rpartition("@")
        if prefix and _number(value) is not None and s["baseline"] is not None:
            series.setdefault(prefix, []).append((float(value), n))
    if series:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), squeeze=False)
        for ax, key, label in zip(axes[0], ("forgetting_recovered", "gain_kept"),
                                  ("forgetting recovered (%)", "downstream gain kept (%)")):
            for prefix, points in series.items():
                points.sort()
                ax.errorbar([x for x, _ in points], [100 * s["methods"][n][key] for _, n in points],
                            yerr=[100 * s["methods"][n][f"{key}_std"] for _, n in points],
                            marker="o", capsize=3, label=prefix)
            ax.axhline(100, color="k", lw=0.6, ls=":")
            ax.set_xlabel(sweep_label or "value")
            ax.set_ylabel(label)
            if sweep_label and "log" in sweep_label:
                ax.set_xscale("log")
            values = sorted({x for points in series.values() for x, _ in points})
            ax.set_xticks(values, [f"{x:g}" for x in values])  # the swept values, not log-minor ticks
            ax.minorticks_off()
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        save(fig, "sweep.png")

    # 5. the forgetting meter: each run's last KL to the base against its final retained score
    if s["meter"]:
        fig, axes = plt.subplots(1, len(s["meter"]), figsize=(4.8 * len(s["meter"]), 4), squeeze=False)
        for ax, (key, m) in zip(axes[0], s["meter"].items()):
            for name in names:
                mine = [(x, y) for x, y, n in m["points"] if n == name]
                if mine:
                    ax.plot(*zip(*mine), "o", color=colours[name], label=name)
            r = m["pearson_r"]
            ax.set_title(f"{key} vs retained ({len(m['points'])} runs, Pearson r = "
                         f"{'n/a' if r is None else f'{r:.2f}'})", fontsize=9)
            ax.set_xlabel(f"{key} at the last validation (nats per token)")
            ax.set_ylabel(f"retained: {ret}")
        axes[0][0].legend(fontsize=6, ncol=2)
        save(fig, "meter.png")
    return written


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


def report(
    runs: str | list[str],
    retained: str,
    downstream: str,
    output_dir: str = "report",
    baseline: str | None = "ft",
    higher_is_better: list[str] | None = None,
    sweep_label: str | None = None,
    labels: dict[str, str] | None = None,
    also: list[str] | None = None,
) -> dict:
    """Write the comparison of a set of runs: `results.md`, `results.json` and PNG plots.

    Plots: `tradeoff.png` (retained against downstream per method, the base model marked),
    `curves.png` (retained, downstream, `val/replay_nll`, `val/task_loss` and the forgetting
    meter's `val/replay_kl` and `val/task_kl` per epoch, mean ± std over seeds), `recovered.png`
    (forgetting recovered and gain kept per method), `meter.png` when the runs logged the meter
    (each run's last KL to the base against its final retained score, with their correlation)
    and, for an ablation whose methods are named `<series>@<value>` (`nll@25`, `kl@25`),
    `sweep.png`: both against the value, one line per series.

    Args:
        runs: A run folder, or a folder to search for runs (e.g. a study's `methods/`), or a
            list of them (`--runs '[a, b]'`). A folder named `seed<k>` is one seed of the method
            named by its parent folder.
        retained: `<task>/<metric>` of retained ability (as logged under `eval/`).
        downstream: `<task>/<metric>` of the downstream task.
        output_dir: Where the table, its JSON and the plots are written.
        baseline: The method everything is measured against (plain fine-tuning); null: none.
        higher_is_better: Metrics that are better higher, where the logs do not tell (no `forget/`).
        sweep_label: The x-axis of `sweep.png` (what `<value>` is); one with "log" in it gets a
            log scale.
        labels: Names to show methods under, by their folder name (`{cfs-nll: nll@25}`: an
            ablation shows another study's runs as one of its points); `baseline` is a shown name.
        also: Further `<task>/<metric>`s (every retained and downstream measure, say) in a second
            table: the base model's score and each method's mean ± std, and how far the baseline
            moved from the base in standard deviations of its seeds.
    """
    loaded = [load_run(p) for p in find_runs([runs] if isinstance(runs, str) else runs)]
    for run in loaded:
        run.method = (labels or {}).get(run.method, run.method)
    summary = summarize(loaded, retained, downstream, baseline, higher_is_better or [])
    summary["meter"] = meter_summary(loaded, retained)
    summary["also"] = summarize_also(loaded, list(also or []), baseline)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary["plots"] = _plots(loaded, summary, out, sweep_label)
    table = to_markdown(summary) + ("\n" + also_markdown(summary) if summary["also"] else "")
    body = table + "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in summary["plots"]) + "\n"
    for name, text in (("results.json", json.dumps(summary, indent=2) + "\n"), ("results.md", body)):
        with atomic_file(out / name) as tmp:
            tmp.write_text(text)
    print(table)
    return summary
