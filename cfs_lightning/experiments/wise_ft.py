"""WiSE-FT: evaluate weight-space interpolations between a base and a fine-tuned checkpoint.

theta(alpha) = (1 - alpha) * theta_base + alpha * theta_ft (Wortsman et al., arXiv 2109.01903):
alpha = 0 is the base model, alpha = 1 the fine-tuned one. Sweeping alpha traces how much
downstream gain is bought with how much retained ability. A single alpha to report is chosen on
held-out documents (`AlphaSelection`), never on the scores it reports; the run's scores (as a
fit's: `scores.SCORES_FILE`) are alpha 0's and the chosen alpha's, with the chosen alpha's
per-item changes since alpha 0, so `cfs report` reads a WiSE-FT run as it reads a fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..evaluation import evaluate_lm, task_manager_for, task_specs
from ..loading import load_causal_lm, load_tokenizer
from ..scores import item_changes, scored, write_scores
from . import plots
from .runs import SWEEP
from .summary import forgetting_recovered, gain_kept
from .tables import markdown_table, write_results


@dataclass
class AlphaSelection:
    """Where one alpha is chosen: validation tasks whose documents the reported tasks never see
    (configs/tasks/*_val.yaml: the last 200 documents, which the test tasks leave out), and
    their retained and downstream metrics. The alpha with the most forgetting recovered plus gain
    kept on these, relative to the sweep's own ends (alpha 0 and 1), is the run's result."""

    tasks: list[str]
    """lm-eval task names or YAML files of the validation documents."""
    retained: str
    """`<task>/<metric>` of retained ability on them."""
    downstream: str
    """`<task>/<metric>` of the downstream task on them."""


def check_compatible(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> None:
    """Refuse two state dicts that do not hold the same tensors with the same shapes."""
    if base.keys() != finetuned.keys():
        only = sorted(base.keys() ^ finetuned.keys())[:5]
        raise ValueError(f"the two checkpoints have different tensors (e.g. {only}); WiSE-FT needs "
                         "the same architecture: export the fine-tuned model merged (no adapters)")
    for name, b in base.items():
        if b.shape != finetuned[name].shape:
            raise ValueError(f"tensor {name} has shape {tuple(b.shape)} in the base but "
                             f"{tuple(finetuned[name].shape)} in the fine-tuned checkpoint; they are "
                             "not the same architecture")


def interpolated_state(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * base + alpha * finetuned for floating tensors; the fine-tuned value otherwise."""
    check_compatible(base, finetuned)
    return {name: torch.lerp(b, finetuned[name], alpha) if b.is_floating_point() else finetuned[name]
            for name, b in base.items()}


def choose_alpha(rows: list[dict[str, float]], select_on: AlphaSelection, better: dict[str, bool]) -> dict:
    """The sweep's row with the most forgetting recovered + gain kept on `select_on`'s metrics,
    relative to the sweep's own ends (alpha 0: the base, alpha 1: the fine-tuned model)."""
    by_alpha = {r["alpha"]: r for r in rows}
    if 0.0 not in by_alpha or 1.0 not in by_alpha:
        raise ValueError(f"WiSE-FT: choosing an alpha needs alphas 0 and 1 in the sweep; it has {sorted(by_alpha)}")
    base, ft = by_alpha[0.0], by_alpha[1.0]
    ret, down = select_on.retained, select_on.downstream
    sign = {m: -1.0 if better[m] else 1.0 for m in (ret, down)}

    def score(r: dict) -> float:
        return (forgetting_recovered(r[ret], ft[ret], base[ret], sign[ret])
                + gain_kept(r[down], ft[down], base[down], sign[down]))

    return max(rows, key=score)


def run_scores(rows: list[dict], chosen: dict, select_on: AlphaSelection, better: dict[str, bool],
               items: dict[float, dict] | None = None) -> list[dict]:
    """The run's evaluations as a fit writes them: the base model (alpha 0), then the chosen
    alpha, with `forget/` (its change since alpha 0, positive: worse), its per-item changes since
    alpha 0 (`scores.item_changes`, from each alpha's `items`) and what it was chosen on."""
    base = next(r for r in rows if r["alpha"] == 0.0)
    items = items or {}
    out = []
    for row in (base, chosen):
        values = {k: v for k, v in row.items() if k != "alpha"}
        changes = item_changes(items.get(0.0, {}), items.get(row["alpha"], {}))
        out.append({"alpha": row["alpha"], **scored(values, base, better), **changes})
    out[-1]["chosen_on"] = [select_on.retained, select_on.downstream]
    return out


def _sweep(base: str, finetuned: str, specs: list, alphas: list[float], needed: list[str], eval_args: dict,
           dtype: str | None, device: str, trust_remote_code: bool) -> tuple[list[dict], dict[str, bool], dict]:
    """Every alpha's lm-eval scores, each metric's direction, and per alpha each document's outcome
    (`Evaluation.items`)."""
    tokenizer = load_tokenizer(finetuned, trust_remote_code)
    model = load_causal_lm(finetuned, dtype, trust_remote_code)
    ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_state = load_causal_lm(base, dtype, trust_remote_code).state_dict()
    check_compatible(base_state, ft_state)  # before any evaluation
    model.to(device).eval()
    task_manager, rows, better, items = task_manager_for(specs), [], {}, {}
    for alpha in alphas:
        model.load_state_dict(interpolated_state(base_state, ft_state, alpha))
        scores, better, items[alpha] = evaluate_lm(model, tokenizer, specs, task_manager=task_manager,
                                                   items=True, **eval_args)
        for key in needed:
            if key not in scores:
                raise KeyError(f"metric {key!r} was not computed; the tasks give {sorted(scores)}")
        rows.append({"alpha": alpha, **scores})
        print(f"alpha={alpha:g}: {needed[0]}={scores[needed[0]]:.4f} {needed[1]}={scores[needed[1]]:.4f}")
    return rows, better, items


def interpolate(
    base: str,
    finetuned: str,
    tasks: list[str],
    retained: str,
    downstream: str,
    alphas: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0],  # noqa: B006 (jsonargparse default)
    output_dir: str = "runs/wise_ft",
    batch_size: int = 16,
    limit: int | float | None = None,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    dtype: str | None = None,
    device: str = "auto",
    trust_remote_code: bool = False,
    select_on: AlphaSelection | None = None,
) -> list[dict]:
    """Evaluate theta(alpha) = (1 - alpha) theta_base + alpha theta_ft for every alpha with lm-eval.

    Writes into `output_dir`: `wise_ft.json` / `wise_ft.md` (one row of scores per alpha, and
    `select_on`), `wise_ft.png` (both scores against alpha, and downstream against retained) and,
    with `select_on`, the run's scores (alpha 0 and the chosen alpha), which `cfs report` reads.

    Args:
        base: The base model (hub name or directory).
        finetuned: The fine-tuned model, same architecture (a `cfs fit` export; LoRA exports are
            merged); its tokenizer is used.
        tasks: lm-eval task names or task YAML files.
        retained: `<task>/<metric>` of retained ability, for the plot.
        downstream: `<task>/<metric>` of the downstream task, for the plot.
        alphas: Interpolation weights of the fine-tuned model (0 = base, 1 = fine-tuned).
        output_dir: Where the scores, table and plot go.
        batch_size, limit, max_length, add_bos_token: lm-eval's, as in `RetainedEval`.
        dtype: Weight dtype (`float32`, `bfloat16`, ...); default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        trust_remote_code: Allow model code shipped with the checkpoint to run.
        select_on: Validation tasks to choose one alpha on (evaluated beside `tasks`, same
            `limit`); without them no alpha is chosen and `cfs report` has no run here.
    """
    if not alphas:
        raise ValueError("interpolate needs at least one alpha")
    if select_on is not None and set(select_on.tasks) & set(tasks):
        raise ValueError(f"select_on.tasks {sorted(set(select_on.tasks) & set(tasks))} are also reported "
                         "tasks: choose alpha on held-out documents (e.g. configs/tasks/*_val.yaml)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    needed = [retained, downstream] + ([select_on.retained, select_on.downstream] if select_on else [])
    eval_args = dict(batch_size=batch_size, limit=limit, max_length=max_length, add_bos_token=add_bos_token)
    rows, better, items = _sweep(base, finetuned, task_specs(tasks + (select_on.tasks if select_on else [])), alphas,
                                 needed, eval_args, dtype, device, trust_remote_code)
    out = Path(output_dir)
    if select_on is not None:
        write_scores(out, run_scores(rows, choose_alpha(rows, select_on, better), select_on, better, items))
    keys = [k for k in rows[0] if k != "alpha"]
    table = markdown_table(["alpha", *keys], [[f"{r['alpha']:g}"] + [f"{r[k]:.4f}" for k in keys] for r in rows]) + "\n"
    sweep = {"select_on": asdict(select_on) if select_on is not None else None, "rows": rows}
    write_results(out, sweep, table, stem=SWEEP.removesuffix(".json"),
                  plots=[plots.wise_ft(rows, retained, downstream, out / "wise_ft.png")])
    return rows
