"""`cfs report`: the comparison of a set of runs, from their scores and logs, as a markdown table
and plots (`runs.py` reads the runs, `summary.py` measures them, `tables.py` and `plots.py` write)."""

from __future__ import annotations

import logging
from pathlib import Path

from . import plots
from .runs import Run, find_runs, load_run
from .summary import meter_summary, summarize, summarize_also, summarize_items
from .tables import also_markdown, comparison_markdown, items_markdown, write_results

log = logging.getLogger(__name__)


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

    Every score is measured from the base model (each fit's evaluation at fit start) and against
    the `baseline` method: forgetting recovered and gain kept (`summary.py`). Plots:
    `tradeoff.png` (retained against downstream per method, the base model marked),
    `curves.png` (retained, downstream, `val/replay_nll`, `val/task_loss` and the forgetting
    meter's `val/replay_kl` and `val/task_kl` per epoch, mean ± std over seeds), `recovered.png`
    (forgetting recovered and gain kept per method), `meter.png` when the runs logged the meter
    (each run's last KL to the base against its final retained score, with their correlation)
    and, for an ablation whose methods are named `<series>@<value>` (`nll@25`, `kl@25`),
    `sweep.png`: both against the value, one line per series.

    Args:
        runs: A run folder, or a folder to search for runs (e.g. a study's `methods/`), or a
            list of them (`--runs '[a, b]'`). A folder named `seed<k>` is one seed of the method
            named by its parent folder. A fit that has logged only its fit-start evaluation
            (still running, or stopped in its first epoch) is left out, and the table says so.
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
    loaded, unfinished = _finished([load_run(p) for p in find_runs([runs] if isinstance(runs, str) else runs)])
    for run in loaded:
        run.method = (labels or {}).get(run.method, run.method)
    summary = summarize(loaded, retained, downstream, baseline, higher_is_better or [])
    summary["meter"] = meter_summary(loaded, retained)
    summary["also"] = summarize_also(loaded, list(also or []), baseline)
    summary["items"] = summarize_items(loaded)
    summary["unfinished"] = [str(r.path) for r in unfinished]
    out = Path(output_dir)
    summary["plots"] = plots.comparison(loaded, summary, out, sweep_label)
    table = comparison_markdown(summary) + "".join("\n" + part for part in (also_markdown(summary),
                                                                           items_markdown(summary)) if part)
    write_results(out, summary, table, plots=summary["plots"])
    return summary


def _finished(loaded: list[Run]) -> tuple[list[Run], list[Run]]:
    """The runs to report, and those left out: a fit still running (or stopped in its first
    epoch) has logged only the base model's scores."""
    unfinished = [r for r in loaded if r.is_fit and r.epochs == [0.0]]
    if unfinished:
        log.warning("cfs report: left out, only their fit-start evaluation logged (unfinished): %s",
                    ", ".join(str(r.path) for r in unfinished))
    if len(unfinished) == len(loaded):
        raise ValueError("cfs report: every run found is unfinished (only its fit-start evaluation is "
                         "logged); report again when at least one has finished an epoch")
    return [r for r in loaded if r not in unfinished], unfinished
