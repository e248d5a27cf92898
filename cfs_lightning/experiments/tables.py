"""The one writer of results: markdown tables, and `<stem>.json` + `<stem>.md` beside their plots.

`cfs report`, `cfs continual` and `cfs interpolate` (WiSE-FT) all write through `write_results`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io import write_text
from ..scores import ITEM_CHANGES


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, the rule, one line per row (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_results(out: Path, results: dict, table: str, stem: str = "results", plots: list[str] = ()) -> None:
    """Write `results` as `<out>/<stem>.json` and the table, with the plots below it, as
    `<out>/<stem>.md` (each atomically); print the table."""
    body = table + ("\n" + "\n".join(f"![{p.rsplit('.', 1)[0]}]({p})" for p in plots) + "\n" if plots else "")
    write_text(out / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    write_text(out / f"{stem}.md", body)
    print(table)


def pm(mean: float, std: float, fmt: str, seeds: int) -> str:
    """`mean ± std` over `seeds` runs (`mean` alone for one run, `-` for NaN), with no `-0`."""
    if math.isnan(mean):
        return "-"
    text = f"{mean:{fmt}}"
    text = text.lstrip("-") if float(text) == 0 else text
    return f"{text} ± {std:{fmt}}" if seeds > 1 else text


def _comparison_lines(s: dict) -> list[str]:
    """The table of `cfs report`: one line per method, after the base model's."""
    better = {True: "higher is better", False: "lower is better"}
    ret, down = s["retained_metric"], s["downstream_metric"]
    header = ["method", "seeds", f"retained: {ret} ({better[s['higher_is_better'][ret]]})",
              f"downstream: {down} ({better[s['higher_is_better'][down]]})"]
    ratios = s["baseline"] is not None
    if ratios:
        header += ["forgetting recovered", "gain kept"]
    rows = [["base model", "-", f"{s['base'][ret]:.4f}", f"{s['base'][down]:.4f}"] + (["100%", "0%"] if ratios else [])]
    for name, r in s["methods"].items():
        label = name + (f" (α = {', '.join(f'{a:g}' for a in sorted(set(r['alpha'])))})" if "alpha" in r else "")
        row = [label, str(r["seeds"]), pm(r["retained"], r["retained_std"], ".4f", r["seeds"]),
               pm(r["downstream"], r["downstream_std"], ".4f", r["seeds"])]
        if ratios:
            row += [f"{pm(100 * r['forgetting_recovered'], 100 * r['forgetting_recovered_std'], '.0f', r['seeds'])}%",
                    f"{pm(100 * r['gain_kept'], 100 * r['gain_kept_std'], '.0f', r['seeds'])}%"]
        rows.append(row)
    return [markdown_table(header, rows), ""]


def comparison_markdown(s: dict) -> str:
    """`cfs report`'s table and what its columns mean."""
    lines = _comparison_lines(s)
    lines.append("Mean ± standard deviation over seeds (one seed: no ±). The base model row is the "
                 "evaluation at fit start.")
    b = s["baseline"]
    if b is not None:
        lines.append(f"Forgetting recovered = (F_{b} − F) / F_{b} and gain kept = G / G_{b}, where F is the "
                     f"retained score's loss since the base model and G the downstream score's improvement "
                     f"over it, against the mean of the {b!r} runs: 100% forgetting recovered is no "
                     "forgetting at all.")
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
    if s.get("unfinished"):
        lines.append("Left out, unfinished (only their fit-start evaluation is logged): "
                     + ", ".join(f"`{p}`" for p in s["unfinished"]) + ".")
    return "\n".join(lines) + "\n"


def items_markdown(s: dict) -> str:
    """Per-item forgetting per method: for each 0-or-1 metric, the share of documents lost (right at
    fit start, wrong at the end) and gained, raw and adjusted for guessing, in percent."""
    items = s.get("items") or {}
    metrics = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in items))
    if not metrics:
        return ""

    def cell(metric: str, method: str) -> str:
        got = [items.get(f"{metric}/{change}", {}).get(method) for change in ITEM_CHANGES]
        if got[0] is None:
            return "-"
        lost, gained, lost_adj, gained_adj = (pm(100 * m, 100 * sd, ".0f", n) for m, sd, n in got)
        runs = got[0][2]
        return f"{lost} / {gained} ({lost_adj} / {gained_adj}), {runs} run{'' if runs == 1 else 's'}"

    methods = list(dict.fromkeys(name for per in items.values() for name in per))
    rows = [[name] + [cell(metric, name) for metric in metrics] for name in methods]
    return "\n".join([markdown_table(["method", *metrics], rows), "",
                      "Per item (arXiv 2510.17776): % of documents lost (right at fit start, wrong at the end) / "
                      "gained, and in brackets both adjusted for guessing (`scores.item_changes`)."]) + "\n"


def also_markdown(s: dict) -> str:
    """The second table: every `also` metric per method, and the baseline's change against its spread."""
    also = s.get("also") or {}
    if not also:
        return ""
    metrics = list(also)
    rows = [["base model"] + [f"{also[m]['base']:.4f}" for m in metrics]]
    rows += [[name] + [pm(*also[m]["methods"][name], ".4f", s["methods"][name]["seeds"]) for m in metrics]
             for name in next(iter(also.values()))["methods"]]
    lines = [markdown_table(["method", *metrics], rows)]
    if s["baseline"] is not None and "change_in_std" in also[metrics[0]]:
        lines += ["", f"{s['baseline']}'s change from the base model, in standard deviations of its seeds: "
                  + ", ".join(f"{m} {also[m]['change_in_std']:.1f}" for m in metrics) + "."]
    return "\n".join(lines) + "\n"
