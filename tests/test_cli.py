from pathlib import Path

import pytest
import torch
import yaml

from cfs_lightning.callbacks import load_task_yaml
from cfs_lightning.cli import main, run_cli
from cfs_lightning.generation import read_manifest

from .conftest import REPO

FIT_CONFIGS = ["configs/toy/pretrain.yaml", "configs/toy/finetune.yaml"]
METHODS = ["ft", "cfs-nll", "cfs-kl", "cfs-kl-topk", "l2", "ema", "lora", "lora+cfs"]
OVERLAYS = {f"configs/toy/{m}.yaml": "configs/toy/finetune.yaml" for m in METHODS}
FUNCTION_CONFIGS = {"configs/toy/init.yaml": "init", "configs/toy/generate.yaml": "generate",
                    "configs/toy/demo.yaml": "demo", "configs/toy/interpolate.yaml": "interpolate"}
TASK_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/tasks").glob("*.yaml"))


def test_every_yaml_is_covered():
    every = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    known = (set(FIT_CONFIGS) | set(OVERLAYS) | set(FUNCTION_CONFIGS) | set(TASK_CONFIGS)
             | {str(p.relative_to(REPO)) for p in (REPO / "configs/examples").glob("*.yaml")})
    assert every == known


@pytest.mark.parametrize("config", FIT_CONFIGS + sorted(OVERLAYS) + sorted(
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
    cli = run_cli(["--config", "configs/toy/pretrain.yaml",
                   f"--model.init_args.pretrained={tiny_model_dir}"], run=False)
    assert cli.datamodule.tokenizer_name == str(tiny_model_dir)


def test_pretrain_config_fast_dev_run(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(REPO)
    run_cli(["fit", "--config", "configs/toy/pretrain.yaml", "--trainer.fast_dev_run=2",
             f"--model.init_args.pretrained={tiny_model_dir}",
             f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
             f"--export.dirpath={tmp_path / 'base'}"])
    assert (tmp_path / "base" / "model.safetensors").is_file()
    assert (tmp_path / "base" / "tokenizer.json").is_file()


EXPECTED_TERMS = {"ft": set(), "cfs-nll": {"nll_replay"}, "cfs-kl": {"kl_to_reference"},
                  "cfs-kl-topk": {"kl_from_cached_top_k"}, "l2": {"l2_to_init"}, "ema": set(),
                  "lora": set(), "lora+cfs": {"nll_replay"}}


@pytest.mark.parametrize("method", [None] + METHODS)
def test_finetune_configs_fast_dev_run(method, tmp_path, monkeypatch, tiny_model_dir, tiny_replay_dir):
    overlay = [f"configs/toy/{method}.yaml"] if method else []
    monkeypatch.chdir(REPO)
    evals = tmp_path / "evals.yaml"
    evals.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "cfs_lightning.callbacks.RetainedEval",
        "init_args": {"tasks": TASK_CONFIGS, "limit": 4, "batch_size": 4}}]}}))
    args = ["fit", "--config", "configs/toy/finetune.yaml"]
    for c in overlay + [str(evals)]:
        args += ["--config", c]
    cli = run_cli(args + ["--trainer.fast_dev_run=2", f"--model.init_args.pretrained={tiny_model_dir}",
                          f"--data.init_args.replay.dir={tiny_replay_dir}", "--data.init_args.replay.val_size=8",
                          f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                          f"--export.dirpath={tmp_path / 'hf'}"])
    metrics = cli.trainer.callback_metrics
    terms = {k.removeprefix("train/reg/") for k in metrics if k.startswith("train/reg/")}
    assert terms == EXPECTED_TERMS.get(method, {"nll_replay"})
    assert all(torch.isfinite(metrics[f"train/reg/{t}"]) for t in terms)
    if method and method.startswith("lora"):
        assert (tmp_path / "hf" / "adapter" / "adapter_config.json").is_file()
    assert "eval/gsm8k_answers/bits_per_byte" in metrics
    assert (tmp_path / "hf" / "config.json").is_file()


def test_generate_command_writes_shards(tmp_path, tiny_model_dir):
    main(["generate", f"--model={tiny_model_dir}", f"--output_dir={tmp_path / 'r'}",
          "--budget.sequences=5", "--sampling.max_new_tokens=6", "--device=cpu"])
    assert read_manifest(tmp_path / "r")["num_sequences"] == 5
