import json
from pathlib import Path

import pytest
import torch
import yaml

from cfs_lightning.evaluation import load_task_yaml
from cfs_lightning.cli import main
from cfs_lightning.experiments.runner import run_cli
from cfs_lightning.shards import read_manifest

from .conftest import REPO, write_jsonl

FIT_CONFIGS = ["configs/toy/base/pretrain.yaml", "configs/toy/base/finetune.yaml",
               "configs/toy2/base/pretrain.yaml", "configs/toy2/base/finetune.yaml",
               "configs/real/smollm2/finetune.yaml", "configs/real/gemma3/finetune.yaml"]
METHODS = ["ft", "cfs-nll", "cfs-kl", "cfs-kl-topk", "l2", "ema", "lora", "lora+cfs", "cs", "real-replay",
           "self-dialogue", "online", "self-output", "rephrase", "stm", "dft", "asft", "on-policy-kl", "sdft"]
OVERLAYS = {f"configs/toy/methods/{m}.yaml": "configs/toy/base/finetune.yaml" for m in METHODS}
STRATEGY_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/strategies").glob("*.yaml"))
PAPER_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/paper").glob("*.yaml"))
OVERLAYS.update({s: "configs/toy/base/finetune.yaml" for s in STRATEGY_CONFIGS})  # added to a run's config
FUNCTION_CONFIGS = {"configs/toy/base/init.yaml": "init", "configs/toy/data/cfs.yaml": "generate",
                    "configs/toy/demo.yaml": "study", "configs/toy/interpolate.yaml": "interpolate",
                    "configs/toy/data/contextual.yaml": "contextual",
                    "configs/toy/data/corpus.yaml": "corpus",
                    "configs/toy/data/self-output.yaml": "self-output",
                    "configs/toy/data/rephrase.yaml": "rephrase",
                    "configs/toy/data/token-mask.yaml": "token-mask",
                    "configs/toy/data/dialogue.yaml": "dialogue",
                    "configs/toy/continual.yaml": "continual", "configs/toy/study.yaml": "study",
                    "configs/toy/study-peers.yaml": "study",
                    "configs/toy/study-data.yaml": "study",
                    **{f"configs/toy/ablation-{a}.yaml": "study" for a in ("budget", "temperature", "weight", "lr")},
                    "configs/toy2/base/init.yaml": "init", "configs/toy2/data/cfs.yaml": "generate",
                    "configs/toy2/data/contextual.yaml": "contextual", "configs/toy2/data/corpus.yaml": "corpus",
                    "configs/toy2/study.yaml": "study",
                    "configs/paper/data/olmo1b_math.yaml": "generate",
                    "configs/real/smollm2/cfs.yaml": "generate", "configs/real/gemma3/cfs.yaml": "generate",
                    "configs/real/smollm2/study.yaml": "study"}
TASK_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/tasks").glob("*.yaml"))
TOY_TASKS = ["configs/tasks/shakespeare_heldout.yaml", "configs/tasks/gsm8k_answers.yaml"]
"""The toy world's evaluations, run after every method's fit (every task YAML runs in the paper
configs' test, whose tiny tokenizer has a chat template)."""


def test_every_yaml_is_covered():
    every = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    known = (set(FIT_CONFIGS) | set(OVERLAYS) | set(FUNCTION_CONFIGS) | set(TASK_CONFIGS)
             | set(STRATEGY_CONFIGS) | set(PAPER_CONFIGS)
             | {str(p.relative_to(REPO)) for p in (REPO / "configs/examples").glob("*.yaml")})
    assert every == known


@pytest.mark.parametrize("config", FIT_CONFIGS + sorted(OVERLAYS) + PAPER_CONFIGS + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "configs/examples").glob("*.yaml")))
def test_fit_configs_print_a_reusable_config(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    configs = [OVERLAYS[config], config] if config in OVERLAYS else [config]
    args = ["fit"] + [a for c in configs for a in ("--config", c)]
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


@pytest.mark.parametrize("config", sorted(FUNCTION_CONFIGS))
def test_command_configs_parse(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main([FUNCTION_CONFIGS[config], "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", TASK_CONFIGS)
def test_task_yamls_load_with_files_resolved(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    cfg = load_task_yaml(REPO / config)
    for path in cfg["dataset_kwargs"]["data_files"].values():
        assert Path(path).is_absolute() and Path(path).is_file()


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


EXPECTED_TERMS = {"ft": set(), "cfs-nll": {"nll_replay"}, "cfs-kl": {"kl_to_reference"},
                  "cfs-kl-topk": {"kl_from_cached_top_k"}, "l2": {"l2_to_init"}, "ema": set(),
                  "lora": set(), "lora+cfs": {"nll_replay"}, "cs": {"nll_replay"}, "real-replay": {"nll_replay"},
                  "self-output": set(), "rephrase": set(), "stm": set(), "dft": set(),
                  "asft": {"kl_to_reference"}, "on-policy-kl": {"kl_to_reference"},
                  "sdft": {"self_distillation"}}
SAMPLERS = {  # online.yaml's, on-policy-kl.yaml's and sdft.yaml's callbacks, at test size
    "online": {"class_path": "cfs_lightning.callbacks.OnlineReplay",
               "init_args": {"every_n_steps": 1, "num_sequences": 4, "batch_size": 2, "sampling": {"max_new_tokens": 8}}},
    "on-policy-kl": {"class_path": "cfs_lightning.callbacks.OnlineReplay",
                     "init_args": {"every_n_steps": 1, "num_sequences": 4, "batch_size": 2,
                                   "sampling": {"max_new_tokens": 8}, "sampler": "trainable", "prompts": "task",
                                   "stream": "onpolicy"}},
    "sdft": {"class_path": "cfs_lightning.callbacks.OnlineReplay",
             "init_args": {"every_n_steps": 1, "num_sequences": 4, "batch_size": 2,
                           "sampling": {"max_new_tokens": 8}, "sampler": "trainable", "prompts": "task",
                           "stream": "onpolicy", "demonstrations": True}}}


@pytest.mark.parametrize("method", [None] + METHODS)
def test_finetune_configs_fast_dev_run(method, tmp_path, monkeypatch, tiny_model_dir, tiny_replay_dir,
                                      tiny_task_shards, tiny_dialogue_dir):
    overlay = [f"configs/toy/methods/{method}.yaml"] if method else []
    monkeypatch.chdir(REPO)
    evals = tmp_path / "evals.yaml"
    evals.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "cfs_lightning.callbacks.RetainedEval",
        "init_args": {"tasks": TOY_TASKS, "limit": 4, "batch_size": 4}}] + ([SAMPLERS[method]] if method in SAMPLERS else [])}}))
    args = ["fit", "--config", "configs/toy/base/finetune.yaml"]
    for c in overlay + [str(evals)]:
        args += ["--config", c]
    own_data = {"self-dialogue": [f"--data.init_args.replay.dir={tiny_dialogue_dir}"]}
    own_data.update({m: [f"--data.init_args.task.shards={tiny_task_shards}"] for m in ("self-output", "rephrase", "stm")})
    cli = run_cli(args + ["--trainer.fast_dev_run=2", f"--model.init_args.pretrained={tiny_model_dir}",
                          f"--data.init_args.replay.dir={tiny_replay_dir}", "--data.init_args.replay.val_size=8",
                          *own_data.get(method, []),
                          f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                          f"--export.dirpath={tmp_path / 'hf'}"])
    metrics = cli.trainer.callback_metrics
    terms = {k.removeprefix("train/reg/") for k in metrics if k.startswith("train/reg/")}
    assert terms == EXPECTED_TERMS.get(method, {"nll_replay"})
    assert all(torch.isfinite(metrics[f"train/reg/{t}"]) for t in terms)
    assert ("train/task_dft" in metrics) == (method in ("dft", "asft"))  # the DFT task loss, logged apart
    if method in ("dft", "asft"):  # p < 1 weights every token down: the logged task_loss is the plain NLL
        assert metrics["train/task_dft"] < metrics["train/task_loss"]
    # the forgetting meter: replay KL from the reference or else the shards' cached top-8; the
    # task KL needs the reference (the KL methods, and online replay, which samples from it)
    # (self-dialogue's shards carry no top-k and it has no reference: its meter is off)
    assert ("val/replay_kl" in metrics) == (method != "self-dialogue")
    assert metrics.get("val/replay_kl", 0) >= 0
    assert ("val/task_kl" in metrics) == (method in ("cfs-kl", "asft", "online", "on-policy-kl", "sdft"))
    if method and method.startswith("lora"):
        assert (tmp_path / "hf" / "adapter" / "adapter_config.json").is_file()
    assert "eval/gsm8k_answers/bits_per_byte" in metrics
    assert (tmp_path / "hf" / "config.json").is_file()


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
