import itertools
import json
import subprocess
import sys
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from cfs_lightning.evaluation import load_task_yaml
from cfs_lightning.cli import main
from cfs_lightning.experiments.runner import run_cli
from cfs_lightning.shards import read_manifest

from .conftest import REPO, write_jsonl

YAMLS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
TASK_CONFIGS = [c for c in YAMLS if c.startswith("configs/tasks/")]
"""lm-eval task YAMLs, read by `RetainedEval`; every other YAML is run by a `cfs` command."""


def header_command(config: str) -> tuple[str, list[str]] | None:
    """The command line that a YAML's header gives to run it (STYLE.md: every YAML's header ends
    with one): the command and its `--config` files in order, or None if the header names none.

    `#   cfs fit --config configs/toy/base/finetune.yaml --config configs/toy/methods/ft.yaml`
    gives `("fit", ["configs/toy/base/finetune.yaml", "configs/toy/methods/ft.yaml"])`.
    """
    runs_it = re.compile(rf"(?:\bcfs|cfs_lightning\.cli) ([a-z][a-z-]*) (.*?)--config {re.escape(config)}(?!\S)")
    header = itertools.takewhile(lambda line: line.startswith("#"), (REPO / config).read_text().splitlines())
    for line in header:
        if found := runs_it.search(line):
            return found.group(1), re.findall(r"--config (\S+)", found.group(2)) + [config]
    return None


RUNS = {c: run for c in YAMLS if c not in TASK_CONFIGS and (run := header_command(c))}
FIT_RUNS = {c: configs for c, (command, configs) in RUNS.items() if command == "fit"}
"""Every fit a header gives, by the config it documents: a config alone, or a method or strategy
overlay after the config it is added to."""
COMMAND_RUNS = {c: command for c, (command, _) in RUNS.items() if command != "fit"}
"""Every other command (`init`, `generate`, `study`, ...) by its config."""
METHODS = sorted(p.stem for p in (REPO / "configs/toy/methods").glob("*.yaml"))
TOY_TASKS = ["configs/tasks/shakespeare_heldout.yaml", "configs/tasks/gsm8k_answers.yaml"]
"""The toy world's evaluations, run after every method's fit (every task YAML runs in the paper
configs' test, whose tiny tokenizer has a chat template)."""


def test_every_yaml_is_covered():
    assert METHODS and FIT_RUNS and COMMAND_RUNS and TASK_CONFIGS
    silent = sorted(set(YAMLS) - set(TASK_CONFIGS) - set(RUNS))
    assert not silent, f"these YAMLs' headers give no command line that runs them: {silent}"
    assert {f"configs/toy/methods/{m}.yaml" for m in METHODS} <= set(FIT_RUNS)
    assert set(EXPECTED) <= {None, *METHODS}, "expectations of a method that has no overlay"
    assert sorted(PAPER) == sorted(c for c in FIT_RUNS if c.startswith("configs/paper/"))


def test_the_configuration_docs_name_every_method_overlay():
    docs = (REPO / "docs/configuration.md").read_text()
    assert [m for m in METHODS if f"`{m}`" not in docs] == []


@pytest.mark.parametrize("config", sorted(FIT_RUNS))
def test_fit_configs_print_a_reusable_config(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = ["fit"] + [a for c in FIT_RUNS[config] for a in ("--config", c)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args + ["--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    full = yaml.safe_load(printed)
    assert full["model"]["init_args"]["pretrained"]
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit) as again:  # the printed config parses on its own
        run_cli(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert again.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out) == full


@pytest.mark.parametrize("config", sorted(COMMAND_RUNS))
def test_command_configs_parse(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([COMMAND_RUNS[config], "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", TASK_CONFIGS)
def test_task_yamls_load_with_files_resolved(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    cfg = load_task_yaml(REPO / config)
    for path in cfg["dataset_kwargs"]["data_files"].values():
        assert Path(path).is_absolute() and Path(path).is_file()


@pytest.mark.parametrize("test_yaml, val_yaml", [("prose_heldout", "prose_heldout_val"),
                                                ("gsm8k_answers", "gsm8k_answers_val")])
def test_validation_documents_are_left_out_of_the_reported_task(test_yaml, val_yaml):
    """A setting chosen on a `*_val` task (WiSE-FT's alpha) never reads a reported document: the two
    splits of the file are disjoint and together the whole file."""
    import importlib.util

    import datasets

    spec = importlib.util.spec_from_file_location("doc_splits", REPO / "configs/tasks/doc_splits.py")
    splits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(splits)
    test_cfg, val_cfg = (yaml.safe_load((REPO / f"configs/tasks/{n}.yaml").read_text().replace("!function ", ""))
                         for n in (test_yaml, val_yaml))
    data = load_task_yaml(REPO / f"configs/tasks/{test_yaml}.yaml")["dataset_kwargs"]["data_files"]["test"]
    rows = datasets.Dataset.from_json(data)
    reported = getattr(splits, test_cfg["process_docs"].split(".")[1])(rows)
    chosen_on = getattr(splits, val_cfg["process_docs"].split(".")[1])(rows)
    assert len(chosen_on) > 0 and len(reported) >= 100  # the studies' limit reads only reported documents
    assert len(reported) + len(chosen_on) == len(rows)
    assert not {json.dumps(r, sort_keys=True) for r in reported} & {json.dumps(r, sort_keys=True) for r in chosen_on}


def test_tokenizer_is_linked_from_the_model(monkeypatch, tiny_model_dir):
    monkeypatch.chdir(REPO)
    cli = run_cli(["--config", "configs/toy/base/pretrain.yaml",
                   f"--model.init_args.pretrained={tiny_model_dir}"], run=False)
    assert cli.datamodule.tokenizer_name == str(tiny_model_dir)


def test_pretrain_config_fast_dev_run(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(REPO)
    run_cli(["fit", "--config", "configs/toy/base/pretrain.yaml", "--trainer.fast_dev_run=2",
             f"--model.init_args.pretrained={tiny_model_dir}",
             f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
             f"--export.dirpath={tmp_path / 'base'}"])
    assert (tmp_path / "base" / "model.safetensors").is_file()
    assert (tmp_path / "base" / "tokenizer.json").is_file()


def test_fits_in_one_process_say_lightnings_notices_once(tmp_path, tiny_model_dir):
    """A study fits many times in one process: Lightning's notices (accelerators, its tip) show at
    the first Trainer only, and its warning against `args` beside a command line not at all."""
    script = f"""
import sys
from cfs_lightning.experiments.runner import run_cli
sys.argv = ["cfs", "study", "--config", "x.yaml"]  # as inside `cfs study`
for run in ("a", "b"):
    run_cli(["fit", "--config", "configs/toy/base/pretrain.yaml", "--trainer.fast_dev_run=1",
             "--model.init_args.pretrained={tiny_model_dir}", "--trainer.logger.init_args.save_dir={tmp_path}/" + run,
             "--export.dirpath={tmp_path}/" + run + "/m"])
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("GPU available:") == 1 and done.stderr.count("Tip:") == 1
    assert "LightningCLI's args parameter" not in done.stderr
    assert (tmp_path / "b" / "m" / "config.json").is_file()  # the second fit ran


class Expected(NamedTuple):
    """What one method's fit logs, written out by hand."""

    terms: set[str]
    """Its regularizers' terms, `train/reg/<name>`."""
    reference: bool = False
    """Whether it holds a frozen reference: its KL terms read one, and online replay samples from it."""
    task_loss: str = ""
    """Its own task loss's name, logged apart as `train/task_<name>` ("": the plain NLL)."""
    lora: bool = False
    """Whether it trains LoRA adapters, exported apart under `adapter/`."""
    replay_kl: bool = True
    """Whether the meter's `val/replay_kl` is logged: from the reference, or else from the shards'
    cached top-8 (self-dialogue's shards carry no top-k and it has no reference)."""


EXPECTED = {None: Expected({"nll_replay"}), "ft": Expected(set()), "cfs-nll": Expected({"nll_replay"}),
            "cfs-kl": Expected({"kl_to_reference"}, reference=True),
            "cfs-kl-topk": Expected({"kl_from_cached_top_k"}), "l2": Expected({"l2_to_init"}),
            "ema": Expected(set()), "bema": Expected(set()), "ewc": Expected({"ewc"}),
            "distill-checkpoint": Expected({"kl_to_reference"}), "lora": Expected(set(), lora=True),
            "lora+cfs": Expected({"nll_replay"}, lora=True), "cs": Expected({"nll_replay"}),
            "real-replay": Expected({"nll_replay"}), "self-dialogue": Expected({"nll_replay"}, replay_kl=False),
            "online": Expected({"nll_replay"}, reference=True), "self-output": Expected(set()),
            "rephrase": Expected(set()), "stm": Expected(set()), "dft": Expected(set(), task_loss="dft"),
            "eaft": Expected(set(), task_loss="eaft"),
            "asft": Expected({"kl_to_reference"}, reference=True, task_loss="dft"),
            "on-policy-kl": Expected({"kl_to_reference"}, reference=True),
            "sdft": Expected({"self_distillation"}, reference=True)}
"""Each method's own fit (None: finetune.yaml alone). A method not here is still run, and held to
what every fit must do."""
STAND_INS = {"generate": "tiny_replay_dir", "contextual": "tiny_replay_dir", "corpus": "tiny_replay_dir",
             "dialogue": "tiny_dialogue_dir", "self-output": "tiny_task_shards", "rephrase": "tiny_task_shards",
             "token-mask": "tiny_task_shards", "fisher": "tiny_fisher_dir"}
"""The fixture that stands in for the shards each data command writes."""


def _yaml(config: str) -> dict:
    return yaml.safe_load((REPO / config).read_text())


WRITTEN_BY = {_yaml(c)["output"]["dir"]: command for c, command in COMMAND_RUNS.items()
              if c.startswith("configs/toy/data/")}
"""The toy world's shards folders, by the command that writes them."""


def _stand_in_data(configs: list[str], request: pytest.FixtureRequest) -> list[str]:
    """Overrides that point each shards folder the configs name at the fixture that stands in for
    what the folder's command writes (self-dialogue's dialogues, Self-Output's task shards, ...)."""
    overrides = []
    for config in configs:
        data = _yaml(config).get("data", {}).get("init_args", {})
        for stream, field in (("replay", "dir"), ("task", "shards")):
            if field in data.get(stream, {}):
                fixture = request.getfixturevalue(STAND_INS[WRITTEN_BY[data[stream][field]]])
                overrides.append(f"--data.init_args.{stream}.{field}={fixture}")
        terms = _yaml(config).get("model", {}).get("init_args", {}).get("regularizers") or []
        stand_ins = {"fisher": lambda path: request.getfixturevalue(STAND_INS[WRITTEN_BY[path]]),  # EWC
                     "teacher": lambda path: request.getfixturevalue("tiny_model_dir")}  # a checkpoint
        reads = [t for t in terms if t["class_path"].endswith((".L2ToInit", ".KLToReference"))]
        if any(k in t.get("init_args", {}) for t in reads for k in stand_ins):
            terms = [{**t, "init_args": {k: str(stand_ins[k](v)) if k in stand_ins and t in reads else v
                                         for k, v in t.get("init_args", {}).items()}} for t in terms]
            overrides.append(f"--model.init_args.regularizers={json.dumps(terms)}")
    return overrides


def _test_size_callbacks(configs: list[str]) -> list[dict]:
    """The configs' callbacks (a later config's list replaces an earlier one's) at test size:
    `RetainedEval` on 4 examples of the toy tasks, online replay of 4 short sequences every step."""
    callbacks = [cbs for c in configs if (cbs := _yaml(c).get("trainer", {}).get("callbacks")) is not None][-1]
    sized = [{"class_path": "cfs_lightning.callbacks.RetainedEval",
              "init_args": {"tasks": TOY_TASKS, "limit": 4, "batch_size": 4}}]
    for callback in callbacks:
        args = callback.get("init_args", {})
        if callback["class_path"].endswith(".OnlineReplay"):
            callback = {**callback, "init_args": {**args, "every_n_steps": 1, "num_sequences": 4, "batch_size": 2,
                                                  "sampling": {**args.get("sampling", {}), "max_new_tokens": 8}}}
        if not callback["class_path"].endswith(".RetainedEval"):
            sized.append(callback)
    return sized


@pytest.mark.parametrize("method", [None] + METHODS)
def test_finetune_configs_fast_dev_run(method, tmp_path, monkeypatch, request, tiny_model_dir):
    configs = FIT_RUNS[f"configs/toy/methods/{method}.yaml"] if method else ["configs/toy/base/finetune.yaml"]
    monkeypatch.chdir(REPO)
    test_size = tmp_path / "test_size.yaml"
    test_size.write_text(yaml.safe_dump({"trainer": {"callbacks": _test_size_callbacks(configs)}}))
    cli = run_cli(["fit", *(a for c in configs + [str(test_size)] for a in ("--config", c)),
                   "--trainer.fast_dev_run=2", f"--model.init_args.pretrained={tiny_model_dir}",
                   *_stand_in_data(configs, request), "--data.init_args.replay.val_size=8",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                   f"--export.dirpath={tmp_path / 'hf'}"])
    metrics, module = cli.trainer.callback_metrics, cli.model
    terms = {k.removeprefix("train/reg/") for k in metrics if k.startswith("train/reg/")}
    assert terms == {r.name for r in module.regularizers if r.adds_term}  # each term, and no other, logged
    assert all(torch.isfinite(metrics[f"train/reg/{t}"]) for t in terms)
    # the forgetting meter: the task KL needs the reference (the KL methods, and online replay,
    # which samples from it); the replay KL reads the reference or else the shards' cached top-8
    assert ("val/task_kl" in metrics) == (module.reference is not None)
    assert metrics.get("val/replay_kl", 0) >= 0
    if module.lora is not None:
        assert (tmp_path / "hf" / "adapter" / "adapter_config.json").is_file()
    assert "eval/gsm8k_answers/bits_per_byte" in metrics
    assert (tmp_path / "hf" / "config.json").is_file()
    if method in EXPECTED:
        expected = EXPECTED[method]
        assert terms == expected.terms
        assert (module.reference is not None) == expected.reference
        assert (module.lora is not None) == expected.lora
        assert ("val/replay_kl" in metrics) == expected.replay_kl
        own = {k for k in metrics if k.startswith("train/task_") and k != "train/task_loss"}
        assert own == ({f"train/task_{expected.task_loss}"} if expected.task_loss else set())  # logged apart
        if expected.task_loss:  # DFT's p and EAFT's entropy weight every token below 1: the plain NLL is larger
            assert metrics[f"train/task_{expected.task_loss}"] < metrics["train/task_loss"]


def test_generate_command_writes_shards(tmp_path, tiny_model_dir):
    main(["generate", f"--base.model={tiny_model_dir}", f"--output.dir={tmp_path / 'r'}",
          "--budget.sequences=5", "--sampling.max_new_tokens=6", "--base.device=cpu"])
    assert read_manifest(tmp_path / "r")["num_sequences"] == 5


PAPER = {  # config -> (hub model, architecture class, record fields the templates read)
    "configs/paper/olmo1b_math.yaml": ("allenai/OLMo-1B-hf", "olmo", "OlmoForCausalLM"),
    "configs/paper/r1_distill_llama8b_medical.yaml": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama",
                                                      "LlamaForCausalLM"),
}
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _paper_records(n: int) -> list[dict]:
    """GSM8K text under the field names of MetaMathQA and medical-o1-reasoning-SFT."""
    rows = [json.loads(line) for line in (REPO / "data/gsm8k/train.jsonl").read_text().splitlines()[:n]]
    return [{"query": r["question"], "response": r["answer"], "Question": r["question"],
             "Complex_CoT": r["answer"].split("####")[0], "Response": r["answer"].split("####")[-1]}
            for r in rows]


@pytest.mark.parametrize("config", sorted(PAPER))
def test_paper_configs_fast_dev_run_with_a_tiny_model_of_the_same_class(config, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from cfs_lightning.training.sharding import DecoderBlockFSDPStrategy
    from cfs_lightning.experiments.init_model import init_model

    hub_name, model_type, architecture = PAPER[config]
    monkeypatch.chdir(REPO)
    paper = yaml.safe_load((REPO / config).read_text())
    assert paper["model"]["init_args"]["pretrained"] == hub_name
    model_dir = init_model(str(tmp_path / "model"), [str(REPO / "data/tinyshakespeare/train.txt")],
                           vocab_size=512, model_type=model_type, seed=0, model_config=dict(
                               hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT
    tok.save_pretrained(model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", _paper_records(40))
    overrides = tmp_path / "tiny.yaml"
    overrides.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto",
                    "fast_dev_run": 2, "logger": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "cfs_lightning.callbacks.RetainedEval",
                                   "init_args": {"tasks": TASK_CONFIGS, "limit": 4, "batch_size": 4}}]},
        "model": {"init_args": {"pretrained": str(model_dir)}},
        "data": {"init_args": {"task": {"path": "json", "name": None, "data_files": {"train": train},
                                        "max_length": 256},
                               "replay": {"dir": str(tmp_path / "replay"), "val_size": 1}}},
        "export": {"dirpath": str(tmp_path / "hf")},
    }))
    # The replay set is written first, as the configs' headers say.
    main(["generate", f"--base.model={model_dir}", f"--output.dir={tmp_path / 'replay'}",
          "--budget.sequences=24", "--sampling.max_new_tokens=16", "--base.device=cpu"])
    cli = run_cli(["fit", "--config", config, "--config", str(overrides)])
    assert type(cli.model.hf_model).__name__ == architecture
    assert "train/reg/nll_replay" in cli.trainer.callback_metrics
    for metric in ("gsm8k_answers/bits_per_byte", "gsm8k_accuracy/accuracy", "analogies/acc",
                   "prose_heldout/bits_per_byte", "capitals_chat/names_capital"):  # every task YAML ran
        assert f"eval/{metric}" in cli.trainer.callback_metrics
    assert (tmp_path / "replay" / "manifest.json").is_file() and (tmp_path / "hf" / "config.json").is_file()
    strategy = paper["trainer"].get("strategy")
    if strategy:  # FSDP1 needs a GPU; its wrap policy is read from this very model class
        assert strategy["class_path"] == "cfs_lightning.training.sharding.DecoderBlockFSDPStrategy"
        from cfs_lightning.training.sharding import decoder_block_classes

        assert {c.__name__ for c in decoder_block_classes(cli.model.model)} == {"LlamaDecoderLayer"}
        with pytest.raises(ValueError, match="builds its auto_wrap_policy"):
            DecoderBlockFSDPStrategy(auto_wrap_policy={object})


def test_data_method_commands_run_from_yaml(tmp_path, tiny_model_dir, tiny_task_files, capsys):
    task = {"path": "json", "data_files": tiny_task_files, "split": "train[:4]", "max_length": 512,
            "prompt": "Question: {question}\nAnswer:", "response": " {answer}"}
    common = {"base": {"model": str(tiny_model_dir), "device": "cpu"}}
    runs = {
        "self-output": {"task": task, "num_samples": 2, "sampling": {"max_new_tokens": 6, "batch_size": 8}},
        "rephrase": {"task": task, "sampling": {"max_new_tokens": 6}},
        "token-mask": {"task": task, "tau": 600.0, "mode": "random"},
        "dialogue": {"num_dialogues": 3, "seeds": ["rain"], "chat_template": str(REPO / "configs/toy/base/chat_template.jinja"),
                     "sampling": {"max_new_tokens": 6}},
    }
    for command, cfg in runs.items():
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump({**common, **cfg, "output": {"dir": str(tmp_path / command)}}))
        main([command, "--config", str(path)])
        manifest = read_manifest(tmp_path / command)
        assert manifest["source"] == {"self-output": "self_output", "token-mask": "token_mask",
                                      "dialogue": "self_dialogue"}.get(command, command)
        assert manifest["num_sequences"] == (3 if command == "dialogue" else 4)
    out = capsys.readouterr().out
    assert "kept their reference" in out and "response tokens" in out and "3 dialogues" in out


def test_the_command_line_shows_our_info_lines(capfd, monkeypatch):
    import logging

    from cfs_lightning.cli import show_logs

    logger = logging.getLogger("cfs_lightning")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh `cfs` process
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    show_logs()
    logging.getLogger("cfs_lightning.data.datamodule").info("replay: 934 draws from 747 sequences")
    assert "cfs_lightning.data.datamodule: replay: 934 draws from 747 sequences" in capfd.readouterr().err
