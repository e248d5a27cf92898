"""Two CPU processes (gloo): DDP and FSDP2 fits with every regularizer, checkpoint and resume, and
the retained-task evaluation equal to a one-process run.

Each fit is the real command line (`python -m cfs_lightning.cli fit --config ... --config
configs/strategies/<strategy>.yaml --trainer.devices=2`) in a subprocess, because Lightning's
launcher re-runs `sys.argv` for the second process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.evaluation import evaluate_lm, task_specs

from .conftest import REPO

LIMIT = 11  # odd: the two ranks get 6 and 5 documents, so lm-eval pads one rank
CHOICE_YAML = """task: gsm8k_yes_no
dataset_path: json
dataset_kwargs:
  data_files: {test: %s}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nIs the answer obvious?"
doc_to_choice: [" yes", " no"]
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def eval_tasks(tmp_path_factory) -> list[str]:
    """Rolling log-likelihood, answer log-likelihood and a two-way multiple choice."""
    choice = tmp_path_factory.mktemp("tasks") / "choice.yaml"
    choice.write_text(CHOICE_YAML % (REPO / "data/gsm8k/test.jsonl"))
    return [str(REPO / "configs/tasks/shakespeare_heldout.yaml"),
            str(REPO / "configs/tasks/gsm8k_answers.yaml"), str(choice)]


def run_fit(config: Path, strategy: str, *extra: str, devices: int = 2) -> None:
    args = [sys.executable, "-m", "cfs_lightning.cli", "fit", "--config", str(config),
            "--config", f"configs/strategies/{strategy}.yaml", f"--trainer.devices={devices}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]


def fit_config(out: Path, model_dir: Path, task_files: dict, replay_dir: Path, tasks: list[str]) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out), "name": "", "version": ""}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(out / "ckpt"), "save_last": True}},
                {"class_path": "cfs_lightning.callbacks.RetainedEval",
                 "init_args": {"tasks": tasks, "limit": LIMIT, "batch_size": 4}},
                {"class_path": "tests.dist_probe.Probe", "init_args": {"out": str(out / "probe")}},
            ],
        },
        "model": {"class_path": "cfs_lightning.training.CausalLMFineTuner", "init_args": {
            "pretrained": str(model_dir),
            "regularizers": [
                {"class_path": "cfs_lightning.training.regularizers.NLLReplay"},
                {"class_path": "cfs_lightning.training.regularizers.KLToReference",
                 "init_args": {"weight": 0.5, "chunk_size": 8}},
                {"class_path": "cfs_lightning.training.regularizers.L2ToInit", "init_args": {"weight": 0.01}},
                {"class_path": "cfs_lightning.training.regularizers.EMA",  # BEMA: theta_0 kept per shard too
                 "init_args": {"ema_power": 0.5, "bias_power": 0.2}},
            ],
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        }},
        "data": {"class_path": "cfs_lightning.data.ReplayDataModule", "init_args": {
            "task": {"path": "json", "data_files": task_files, "val_split": "test",
                     "prompt": "Question: {question}\nAnswer:", "response": " {answer}",
                     "max_length": 320},
            "batch_size": 4, "replay_ratio": 0.5,
            "replay": {"dir": str(replay_dir), "val_size": 8},
        }},
        "export": {"dirpath": str(out / "hf_model")},
    }
    path = out / "fit.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def one_process_scores(tiny_model_dir, eval_tasks) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    values, _, _ = evaluate_lm(model, AutoTokenizer.from_pretrained(tiny_model_dir), task_specs(eval_tasks),
                            batch_size=4, limit=LIMIT)
    assert {k.split("/")[0] for k in values} == {"shakespeare_heldout", "gsm8k_answers", "gsm8k_yes_no"}
    return values


def load(out: Path, phase: str) -> list[dict]:
    return [torch.load(out / "probe" / f"{phase}-rank{r}.pt") for r in range(2)]


def tensors_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ddp runs under `-m slow`: the default run keeps the sharded case, which crosses the same checkpoint,
# resume and evaluation paths and the sharding besides (keeps CI inside ten minutes on two cores)
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp2"])
def test_two_process_fit_checkpoint_resume_and_eval(strategy, tmp_path, tiny_model_dir, tiny_task_files,
                                                    tiny_replay_dir, eval_tasks, one_process_scores):
    out = tmp_path / strategy
    config = fit_config(out, tiny_model_dir, tiny_task_files, tiny_replay_dir, eval_tasks)
    run_fit(config, strategy)
    start, saved = load(out, "start"), load(out, "saved")
    sharded = strategy == "fsdp2"
    for rank in range(2):
        assert start[rank]["world_size"] == 2 and saved[rank]["step"] == 3
        assert start[rank]["model_sharded"] is sharded and start[rank]["reference_sharded"] is sharded
        assert not start[rank]["reference_shares_params"]
        assert tensors_equal(start[rank]["l2_initial"], start[rank]["params"])  # theta_0 = the start
        assert tensors_equal(start[rank]["ema_theta0"], start[rank]["params"])
        assert saved[rank]["ema_updates"] == 3
        assert not tensors_equal(saved[rank]["ema_average"], start[rank]["params"])
    # Each rank trains on its own replay rows (the cycling sampler is split, not repeated).
    rows = [{tuple(r) for r in s["replay_rows"]} for s in saved]
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    shapes = [[p.shape for p in s["params"]] for s in start]
    if sharded:  # each rank holds half of every parameter's first dimension
        full = [p.shape for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()]
        assert [a[0] + b[0] for a, b in zip(*shapes)] == [f[0] for f in full]
        assert not tensors_equal(saved[0]["ema_average"], saved[1]["ema_average"])
    else:
        assert tensors_equal(saved[0]["ema_average"], saved[1]["ema_average"])

    metrics = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/reg/nll_replay", "train/reg/kl_to_reference", "train/reg/l2_to_init"} <= set(metrics)
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    ema_final = torch.cat([torch.cat([a.flatten() for a in s["ema_average"]]) for s in saved])
    assert torch.isfinite(ema_final).all() and sum(p.numel() for p in exported.parameters()) > 0

    # The retained-task scores of the base model, on 2 processes, equal a 1-process run's.
    history = json.loads((out / "retained_eval.json").read_text())
    for key, value in one_process_scores.items():
        assert history[0][f"eval/{key}"] == pytest.approx(value, rel=1e-5)
    # per item, over the documents of both ranks: gained less lost is the change in accuracy
    end = history[-1]
    assert end["items/gsm8k_yes_no/acc/gained"] - end["items/gsm8k_yes_no/acc/forgotten"] == pytest.approx(
        end["eval/gsm8k_yes_no/acc"] - history[0]["eval/gsm8k_yes_no/acc"])

    # Resume for a second epoch: every rank gets back its weights, average and theta_0.
    run_fit(config, strategy, "--trainer.max_epochs=2", f"--ckpt_path={out / 'ckpt' / 'last.ckpt'}")
    resumed = load(out, "start")
    for rank in range(2):
        assert resumed[rank]["step"] == 3 and resumed[rank]["ema_updates"] == 3
        assert tensors_equal(resumed[rank]["params"], saved[rank]["params"])
        assert tensors_equal(resumed[rank]["ema_average"], saved[rank]["ema_average"])
        assert tensors_equal(resumed[rank]["l2_initial"], start[rank]["l2_initial"])
        assert tensors_equal(resumed[rank]["ema_theta0"], start[rank]["ema_theta0"])
        assert resumed[rank]["ema_alpha"] == saved[rank]["ema_alpha"] > 0
    assert load(out, "saved")[0]["step"] == 6
    history = json.loads((out / "retained_eval.json").read_text())
    assert [h["step"] for h in history] == [0, 3, 6]  # the fit-start baseline survived the resume


@pytest.mark.parametrize("budget", [["--budget.sequences=37"], ["--budget.tokens=301"]])
def test_generation_on_two_processes_splits_the_budget_exactly(budget, tmp_path, tiny_model_dir):
    from cfs_lightning.sampling import Budget, SamplingConfig
    from cfs_lightning.replay.context_free import generate_replay
    from cfs_lightning.shards import load_shards, read_manifest

    out = tmp_path / "replay"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "cfs_lightning.cli", "generate", f"--base.model={tiny_model_dir}", f"--output.dir={out}",
            "--sampling.batch_size=8", "--sampling.max_new_tokens=20", "--sampling.seed=3",
            "--output.shard_size=4", "--store_topk=3", "--base.device=cpu", *budget]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    manifest = read_manifest(out)
    assert manifest["world_size"] == 2
    assert {s["file"].split("-")[1] for s in manifest["shards"]} == {"r000", "r001"}
    one = tmp_path / "one"
    key, value = budget[0].removeprefix("--budget.").split("=")
    generate_replay(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir), one,
                    SamplingConfig(batch_size=8, max_new_tokens=20, seed=3),
                    Budget(**{key: int(value)}), shard_size=4, store_topk=3)
    single = read_manifest(one)
    for field in ("num_sequences", "num_generated_tokens"):
        assert manifest[field] == single[field]
    if key == "sequences":
        assert manifest["num_sequences"] == 37
    else:
        assert manifest["num_generated_tokens"] == 301

    def rows(replay_dir):  # the multiset of sequences, with their cached top-k
        data = load_shards(replay_dir)
        return sorted((tuple(r["input_ids"].tolist()), tuple(map(tuple, r["topk_ids"].tolist())))
                      for r in data)

    assert rows(out) == rows(one)


def test_fsdp2_with_lora_shards_the_reference_copy_and_exports_the_merged_model(
        tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir, eval_tasks):
    out = tmp_path / "lora"
    config = fit_config(out, tiny_model_dir, tiny_task_files, tiny_replay_dir, eval_tasks[:1])
    run_fit(config, "fsdp2", "--model.init_args.lora.r=4", "--model.init_args.lora.alpha=8",
            "--model.init_args.reference=copy")
    saved = load(out, "saved")
    for rank in range(2):
        assert saved[rank]["reference_sharded"] and not saved[rank]["reference_shares_params"]
        assert saved[rank]["ema_updates"] == 3
    assert (out / "hf_model" / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "hf_model").state_dict()
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # only the LoRA-adapted projections moved


ODD_LLAMA = dict(hidden_size=45, head_dim=16, intermediate_size=63, num_hidden_layers=2, num_attention_heads=3,
                 num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)


def test_fsdp2_l2_ewc_and_ema_on_parameters_that_do_not_split_evenly(tmp_path, tiny_task_files):
    """Vocabulary 509 and hidden 45: most parameters' first dimension splits 255 + 254 or 23 + 22.
    EWC cuts its Fisher as each parameter is cut: with F = 4 everywhere it is 4 times l2 exactly."""
    from cfs_lightning.experiments.init_model import init_model
    from cfs_lightning.replay.fisher import estimate_fisher
    from cfs_lightning.shards import model_fingerprint
    from cfs_lightning.shards.fisher import write_fisher

    from .conftest import SHAKESPEARE

    model_dir = init_model(str(tmp_path / "odd"), [str(SHAKESPEARE / "train.txt")], vocab_size=509,
                           model_config=ODD_LLAMA, seed=0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert base.get_output_embeddings().weight.shape == (509, 45)
    record = {"model": "odd", "model_fingerprint": model_fingerprint(base)}
    fisher, _ = estimate_fisher(base, [[1, 5, 9, 300, 7], [2, 400, 3]], show=False)
    write_fisher(tmp_path / "fisher", fisher, record)
    write_fisher(tmp_path / "fours", {n: torch.full_like(f, 4.0) for n, f in fisher.items()}, record)
    out = tmp_path / "fit"
    config = yaml.safe_load(fit_config(out, model_dir, tiny_task_files, tmp_path, []).read_text())
    config["trainer"]["callbacks"] = []
    config["trainer"]["limit_train_batches"] = 2
    config["model"]["init_args"]["regularizers"] = [
        {"class_path": "cfs_lightning.training.regularizers.L2ToInit", "init_args": {"weight": 0.01}},
        {"class_path": "cfs_lightning.training.regularizers.L2ToInit",
         "init_args": {"weight": 0.01, "fisher": str(tmp_path / "fisher")}},
        {"class_path": "cfs_lightning.training.regularizers.L2ToInit",
         "init_args": {"weight": 0.01, "fisher": str(tmp_path / "fours"), "name": "ewc4"}},
        {"class_path": "cfs_lightning.training.regularizers.EMA", "init_args": {"decay": 0.5}},
    ]
    config["data"]["init_args"].update(replay_ratio=0.0, replay=None)
    (out / "fit.yaml").write_text(yaml.safe_dump(config))
    run_fit(out / "fit.yaml", "fsdp2")

    rows = [r for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")

    def logged(key: str) -> list[float]:
        column = header.index(key)
        return [float(r.split(",")[column]) for r in rows if r.split(",")[column]]

    l2, ewc, ewc4 = logged("train/reg/l2_to_init"), logged("train/reg/ewc"), logged("train/reg/ewc4")
    assert len(l2) == 2 and l2[0] == 0.0 and l2[1] > 0  # theta_0 at step 0; moved after one step
    assert ewc[0] == 0.0 and ewc[1] > 0 and ewc4 == pytest.approx([4 * v for v in l2], rel=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model").state_dict()
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, exported[k])]
    assert "lm_head.weight" in moved and "model.embed_tokens.weight" in moved


def test_fsdp2_llama_pro_distilled_from_a_sharded_teacher(tmp_path, tiny_model_dir, tiny_task_files):
    """Block expansion under FSDP2 (frozen and trainable parameters in the same units) with a KL on
    the task to a teacher checkpoint sharded in units of its own: only the new blocks move, and
    the export is a plain 4-block checkpoint. The ranks' task batches hold different numbers of
    response tokens, so of head chunks: the teacher's head is gathered once for all of them."""
    out = tmp_path / "fit"
    config = yaml.safe_load(fit_config(out, tiny_model_dir, tiny_task_files, tmp_path, []).read_text())
    config["trainer"]["callbacks"] = []
    config["trainer"]["limit_train_batches"] = 2
    config["model"]["init_args"]["trainable"] = {"expand_blocks": 2}
    config["model"]["init_args"]["regularizers"] = [
        {"class_path": "cfs_lightning.training.regularizers.KLToReference",
         "init_args": {"on": "task", "teacher": str(tiny_model_dir), "chunk_size": 8}}]
    config["data"]["init_args"].update(replay_ratio=0.0, replay=None)
    (out / "fit.yaml").write_text(yaml.safe_dump(config))
    run_fit(out / "fit.yaml", "fsdp2")

    header, *rows = (out / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("train/reg/kl_to_reference")
    kl = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # the teacher is the base here
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    assert exported.config.num_hidden_layers == 4 and exported.config.expanded_blocks["added"] == [1, 3]
    state = exported.state_dict()
    for name, tensor in state.items():
        index = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        if index in (1, 3):  # a new block: trained
            continue
        # everything else is frozen: the original blocks (renumbered), embeddings, norm and head
        source = name if index is None else name.replace(f".layers.{index}.", f".layers.{index // 2}.")
        assert torch.equal(tensor, base[source]), name
    # the new blocks trained: their output projections, zero when inserted, are not any more
    assert all(state[f"model.layers.{i}.{p}.weight"].abs().sum() > 0
               for i in (1, 3) for p in ("self_attn.o_proj", "mlp.down_proj"))
