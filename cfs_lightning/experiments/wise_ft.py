"""WiSE-FT: evaluate weight-space interpolations between a base and a fine-tuned checkpoint.

theta(alpha) = (1 - alpha) * theta_base + alpha * theta_ft (Wortsman et al., arXiv 2109.01903):
alpha = 0 is the base model, alpha = 1 the fine-tuned one. Sweeping alpha traces how much
downstream gain is bought with how much retained ability. A single alpha to report is chosen on
held-out documents (`AlphaSelection`), never on the scores it reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..evaluation import evaluate_lm, task_manager_for, task_specs
from ..io import atomic_file
from ..loading import load_causal_lm, load_tokenizer


@dataclass
class AlphaSelection:
    """Where one alpha is chosen: validation tasks whose documents the reported tasks never see
    (configs/tasks/*_val.yaml: the last 200 documents, which the test tasks leave out), and
    their retained and downstream metrics. `cfs report` keeps, per seed, the alpha with the most
    forgetting recovered plus gain kept on these, and reports that alpha's test scores."""

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

    Writes `wise_ft.json` (`select_on` and one row of scores per alpha), `wise_ft.md` (the table)
    and `wise_ft.png` (retained and downstream scores against alpha, and downstream against
    retained) into `output_dir`.

    Args:
        base: The base model (hub name or directory).
        finetuned: The fine-tuned model, same architecture (a `cfs fit` export; LoRA exports are
            merged); its tokenizer is used.
        tasks: lm-eval task names or task YAML files.
        retained: `<task>/<metric>` of retained ability, for the plot.
        downstream: `<task>/<metric>` of the downstream task, for the plot.
        alphas: Interpolation weights of the fine-tuned model (0 = base, 1 = fine-tuned).
        output_dir: Where the table and plot go.
        batch_size: lm-eval batch size.
        limit: Documents per task (int) or fraction (float); None: all.
        max_length: Context length for lm-eval; default: the model's.
        add_bos_token: Passed to lm-eval's HFLM; None keeps the tokenizer's own behaviour.
        dtype: Weight dtype (`float32`, `bfloat16`, ...); default float32.
        device: `auto` (CUDA when available), `cpu`, `cuda`, ...
        trust_remote_code: Allow model code shipped with the checkpoint to run.
        select_on: Validation tasks to choose one alpha on (evaluated beside `tasks`, same
            `limit`); `cfs report` needs them to put the sweep in its table.
    """
    if not alphas:
        raise ValueError("interpolate needs at least one alpha")
    if select_on is not None and set(select_on.tasks) & set(tasks):
        raise ValueError(f"select_on.tasks {sorted(set(select_on.tasks) & set(tasks))} are also reported "
                         "tasks: choose alpha on held-out documents (e.g. configs/tasks/*_val.yaml)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(finetuned, trust_remote_code)
    model = load_causal_lm(finetuned, dtype, trust_remote_code)
    ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_state = load_causal_lm(base, dtype, trust_remote_code).state_dict()
    check_compatible(base_state, ft_state)  # before any evaluation
    model.to(device).eval()
    specs = task_specs(tasks + (select_on.tasks if select_on is not None else []))
    task_manager = task_manager_for(specs)
    needed = [retained, downstream] + ([select_on.retained, select_on.downstream] if select_on else [])
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolated_state(base_state, ft_state, alpha))
        scores, _ = evaluate_lm(model, tokenizer, specs, batch_size, limit, max_length, add_bos_token,
                                task_manager)
        for key in needed:
            if key not in scores:
                raise KeyError(f"metric {key!r} was not computed; the tasks give {sorted(scores)}")
        rows.append({"alpha": alpha, **scores})
        print(f"alpha={alpha:g}: {retained}={scores[retained]:.4f} {downstream}={scores[downstream]:.4f}")
    out = Path(output_dir)
    sweep = {"select_on": asdict(select_on) if select_on is not None else None, "rows": rows}
    for name, write in (("wise_ft.json", lambda p: p.write_text(json.dumps(sweep, indent=2) + "\n")),
                        ("wise_ft.md", lambda p: p.write_text(to_markdown(rows))),
                        ("wise_ft.png", lambda p: plot(rows, retained, downstream, p))):
        with atomic_file(out / name) as tmp:
            write(tmp)
    print(to_markdown(rows))
    return rows


def to_markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "alpha"]
    lines = ["| alpha | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['alpha']:g} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], retained: str, downstream: str, path: Path) -> None:
    """Both scores against alpha (left) and downstream against retained, labelled by alpha (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    ret, down = [r[retained] for r in rows], [r[downstream] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
