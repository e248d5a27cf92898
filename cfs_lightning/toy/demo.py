"""The toy-world demo: base model -> CFS replay -> plain fine-tuning vs fine-tuning with replay.

Each step is an ordinary `cfs` command run in this process on a shipped config; steps whose output
already exists (the base model, the replay shards) are reused, so the base is built once.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from ..cli import run_cli, run_command, run_fit
from ..commands import generate
from ..report import forgetting_recovered, gain_kept
from .init_model import init_model


def build_base(base_dir: str | Path, init_config: str = "configs/toy/init.yaml",
               pretrain_config: str = "configs/toy/pretrain.yaml", pretrain_args: list[str] = ()) -> Path:
    """The toy base model: `cfs init` (tokenizer + random model) then `cfs fit` pretraining (with
    `pretrain_args` overrides, e.g. `--trainer.max_steps=20` for a quick one), with the
    intermediate folders (`init/`, `pretrain/`) beside `base_dir`."""
    base_dir = Path(base_dir)
    rank_zero_info(f"[toy] building the toy base model in {base_dir}")
    init_dir = base_dir.parent / "init"
    run_command(init_model, init_config, {"output_dir": str(init_dir), "overwrite": True})
    run_cli(["fit", "--config", pretrain_config, f"--model.init_args.pretrained={init_dir}",
             f"--trainer.logger.init_args.save_dir={base_dir.parent / 'pretrain'}",
             f"--export.dirpath={base_dir}", *pretrain_args])
    return base_dir


def _score(history: dict, key: str) -> float:
    if key not in history:
        raise KeyError(f"metric {key!r} not logged; logged: {sorted(history)}")
    return history[key]


def summarize(base: dict, plain: dict, cfs: dict, retained: str, downstream: str) -> dict:
    """Scores of the three models and the two ratios (both metrics lower-is-better)."""
    b_ret, f_ret, c_ret = (_score(h, f"eval/{retained}") for h in (base, plain, cfs))
    b_down, f_down, c_down = (_score(h, f"eval/{downstream}") for h in (base, plain, cfs))
    return {
        "retained_metric": retained,
        "downstream_metric": downstream,
        "base": {"retained": b_ret, "downstream": b_down},
        "plain_ft": {"retained": f_ret, "downstream": f_down},
        "cfs": {"retained": c_ret, "downstream": c_down},
        "forgetting_recovered": forgetting_recovered(c_ret, f_ret, b_ret),
        "downstream_gain_kept": gain_kept(c_down, f_down, b_down),
    }


def to_markdown(s: dict) -> str:
    rows = [
        f"| model | retained: {s['retained_metric']} (lower is better) "
        f"| downstream: {s['downstream_metric']} (lower is better) |",
        "|---|---|---|",
    ]
    for name, key in (("base", "base"), ("plain fine-tuning", "plain_ft"), ("CFS replay", "cfs")):
        rows.append(f"| {name} | {s[key]['retained']:.4f} | {s[key]['downstream']:.4f} |")
    rows += [
        "",
        f"forgetting recovered = (FT_ret - CFS_ret) / (FT_ret - base_ret) = "
        f"{s['forgetting_recovered']:.1%}",
        f"downstream gain kept = CFS_gain / FT_gain = {s['downstream_gain_kept']:.1%}",
    ]
    return "\n".join(rows) + "\n"


def run_demo(
    output_dir: str = "runs/toy",
    init_config: str = "configs/toy/init.yaml",
    pretrain_config: str = "configs/toy/pretrain.yaml",
    generate_config: str = "configs/toy/generate.yaml",
    finetune_config: str = "configs/toy/finetune.yaml",
    plain_overlay: str = "configs/toy/ft.yaml",
    retained_metric: str = "shakespeare_heldout/bits_per_byte",
    downstream_metric: str = "gsm8k_answers/bits_per_byte",
    rebuild: bool = False,
) -> dict:
    """Build the toy base (once), generate CFS replay (once), fine-tune plain and with replay.

    Writes `results.json` and `results.md` under `output_dir` and prints the table.

    Args:
        output_dir: Where every step writes (`init/`, `pretrain/`, `base/`, `cfs_replay/`,
            `ft/`, `cfs/`); the step configs' paths are redirected here.
        init_config: `cfs init` config of the from-scratch model.
        pretrain_config: `cfs fit` config pretraining it into the base model.
        generate_config: `cfs generate` config of the replay shards.
        finetune_config: `cfs fit` config of fine-tuning with CFS replay.
        plain_overlay: Config laid over `finetune_config` for plain fine-tuning.
        retained_metric: `<task>/<metric>` of retained ability (lower is better).
        downstream_metric: `<task>/<metric>` of the downstream task (lower is better).
        rebuild: Rebuild the base model and the replay shards even if present.
    """
    out = Path(output_dir)
    base_dir, replay_dir = out / "base", out / "cfs_replay"
    if rebuild or not (base_dir / "config.json").is_file():
        build_base(base_dir, init_config, pretrain_config)
    if rebuild or not (replay_dir / "manifest.json").is_file():
        rank_zero_info(f"[demo] generating CFS replay in {replay_dir}")
        run_command(generate, generate_config,
                    {"model": str(base_dir), "output_dir": str(replay_dir), "overwrite": True})
    common = [f"--model.init_args.pretrained={base_dir}",
              f"--data.init_args.replay.dir={replay_dir}"]
    plain = run_fit([finetune_config, plain_overlay], common + [
        f"--trainer.logger.init_args.save_dir={out / 'ft'}", f"--export.dirpath={out / 'ft/hf_model'}"])
    cfs = run_fit([finetune_config], common + [
        f"--trainer.logger.init_args.save_dir={out / 'cfs'}", f"--export.dirpath={out / 'cfs/hf_model'}"])
    summary = summarize(cfs.history[0], plain.history[-1], cfs.history[-1],
                        retained_metric, downstream_metric)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = to_markdown(summary)
    (out / "results.md").write_text(table)
    print(table)
    return summary
