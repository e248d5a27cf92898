"""The plots of a comparison of runs and of a WiSE-FT sweep (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..io import atomic_file
from ..scores import CURVES
from .runs import Run, number
from .summary import mean_std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 110) -> str:
    """Write `fig` to `path` atomically, close it, and return the file's name."""
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    _pyplot().close(fig)
    return path.name


def _colours(names: list[str]) -> dict[str, tuple]:
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # tab20's strong colours first
    return {n: _pyplot().get_cmap("tab20")(order[i % 20]) for i, n in enumerate(names)}


def tradeoff(runs: list[Run], s: dict, colours: dict) -> object:
    """Retained against downstream per method, the base model marked, WiSE-FT's sweeps dashed."""
    ret, down, hib = s["retained_metric"], s["downstream_metric"], s["higher_is_better"]
    fig, ax = _pyplot().subplots(figsize=(7.5, 5.5))
    ax.plot(s["base"][ret], s["base"][down], "k*", markersize=16, label="base model")
    for name, r in s["methods"].items():
        ax.errorbar(r["retained"], r["downstream"], xerr=r["retained_std"], yerr=r["downstream_std"],
                    fmt="o", color=colours[name], capsize=3, label=name)
        ax.annotate(name, (r["retained"], r["downstream"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for run in runs:
        if run.sweep is not None:
            ax.plot([p[ret] for p in run.sweep], [p[down] for p in run.sweep], "--", lw=0.8,
                    color=colours[run.method], alpha=0.6)
    ax.set_xlabel(f"retained: {ret} ({'higher' if hib[ret] else 'lower'} is better)")
    ax.set_ylabel(f"downstream: {down} ({'higher' if hib[down] else 'lower'} is better)")
    ax.set_title("Forgetting vs learning: the best corner is "
                 f"{'right' if hib[ret] else 'left'}-{'top' if hib[down] else 'bottom'}")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _series(run: Run, key: str) -> dict[float, float]:
    """A fit's values of `key` (a logged curve, or a retained / downstream score) by epoch."""
    if key in CURVES:
        return dict(run.curves.get(key, []))
    return {e: v[key] for e, v in zip(run.epochs, run.evals) if key in v}


def curves(runs: list[Run], s: dict, colours: dict) -> object:
    """Per-epoch curves of the scores and the validation keys, mean over seeds with a ± std band."""
    ret, down = s["retained_metric"], s["downstream_metric"]
    panels = [(ret, "retained"), (down, "downstream")] + [(k, k) for k in CURVES if any(k in r.curves for r in runs)]
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name in s["methods"]:
            series = [_series(run, key) for run in runs if run.method == name and run.is_fit]
            xs = sorted({x for ser in series for x in ser})
            if not xs:
                continue
            stats = [mean_std([ser[x] for ser in series if x in ser]) for x in xs]
            ax.plot(xs, [m for m, _ in stats], "o-", ms=3, color=colours[name], label=name)
            ax.fill_between(xs, [m - d for m, d in stats], [m + d for m, d in stats], color=colours[name],
                            alpha=0.15, lw=0)
        ax.set_title(f"{title}: {key}" if title != key else key, fontsize=9)
        ax.set_xlabel("epochs completed (0: base model)")
    axes[0][0].legend(fontsize=6, ncol=2)
    return fig


def recovered(runs: list[Run], s: dict, colours: dict) -> object | None:
    """Forgetting recovered and gain kept per method, relative to the baseline."""
    if s["baseline"] is None:
        return None
    shown = [n for n in s["methods"] if n != s["baseline"]]
    fig, ax = _pyplot().subplots(figsize=(7.5, 0.4 * len(shown) + 1.5))
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
    return fig


def sweep(s: dict, label: str | None) -> object | None:
    """An ablation: methods named `<series>@<value>`, both ratios against the value."""
    series: dict[str, list[tuple[float, str]]] = {}
    for n in s["methods"]:
        prefix, _, value = n.rpartition("@")
        if prefix and number(value) is not None and s["baseline"] is not None:
            series.setdefault(prefix, []).append((float(value), n))
    if not series:
        return None
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.8), squeeze=False)
    values = sorted({x for points in series.values() for x, _ in points})
    for ax, key, ylabel in zip(axes[0], ("forgetting_recovered", "gain_kept"),
                               ("forgetting recovered (%)", "downstream gain kept (%)")):
        for prefix, points in series.items():
            points.sort()
            ax.errorbar([x for x, _ in points], [100 * s["methods"][n][key] for _, n in points],
                        yerr=[100 * s["methods"][n][f"{key}_std"] for _, n in points],
                        marker="o", capsize=3, label=prefix)
        ax.axhline(100, color="k", lw=0.6, ls=":")
        ax.set_xlabel(label or "value")
        ax.set_ylabel(ylabel)
        if label and "log" in label:
            ax.set_xscale("log")
        ax.set_xticks(values, [f"{x:g}" for x in values])  # the swept values, not log-minor ticks
        ax.minorticks_off()
    axes[0][0].legend(fontsize=8)
    return fig


def meter(s: dict, colours: dict) -> object | None:
    """The forgetting meter: each run's last KL to the base against its final retained score."""
    if not s["meter"]:
        return None
    fig, axes = _pyplot().subplots(1, len(s["meter"]), figsize=(4.8 * len(s["meter"]), 4), squeeze=False)
    for ax, (key, m) in zip(axes[0], s["meter"].items()):
        for name in s["methods"]:
            mine = [(x, y) for x, y, n in m["points"] if n == name]
            if mine:
                ax.plot(*zip(*mine), "o", color=colours[name], label=name)
        r = m["pearson_r"]
        ax.set_title(f"{key} vs retained ({len(m['points'])} runs, Pearson r = "
                     f"{'n/a' if r is None else f'{r:.2f}'})", fontsize=9)
        ax.set_xlabel(f"{key} at the last validation (nats per token)")
        ax.set_ylabel(f"retained: {s['retained_metric']}")
    axes[0][0].legend(fontsize=6, ncol=2)
    return fig


def comparison(runs: list[Run], s: dict, out: Path, sweep_label: str | None = None) -> list[str]:
    """Every plot of `cfs report` that applies, written into `out`; their file names."""
    colours = _colours(list(s["methods"]))
    figures: dict[str, Callable[[], object | None]] = {
        "tradeoff.png": lambda: tradeoff(runs, s, colours), "curves.png": lambda: curves(runs, s, colours),
        "recovered.png": lambda: recovered(runs, s, colours), "sweep.png": lambda: sweep(s, sweep_label),
        "meter.png": lambda: meter(s, colours)}
    written = []
    for name, draw in figures.items():
        fig = draw()
        if fig is not None:
            written.append(save(fig, out / name))
    return written


def wise_ft(rows: list[dict], retained: str, downstream: str, path: Path) -> str:
    """Both scores against alpha (left) and downstream against retained, labelled by alpha (right)."""
    alphas = [r["alpha"] for r in rows]
    ret, down = [r[retained] for r in rows], [r[downstream] for r in rows]
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(10, 4))
    left.plot(alphas, ret, "o-", label=f"retained: {retained}")
    left.plot(alphas, down, "s-", label=f"downstream: {downstream}")
    left.set_xlabel("alpha (0 = base, 1 = fine-tuned)")
    left.legend(fontsize=8)
    right.plot(ret, down, "o-")
    for a, x, y in zip(alphas, ret, down):
        right.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set_xlabel(retained)
    right.set_ylabel(downstream)
    fig.suptitle("WiSE-FT: theta(alpha) = (1 - alpha) theta_base + alpha theta_ft")
    return save(fig, path, dpi=120)
