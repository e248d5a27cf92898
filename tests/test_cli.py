from pathlib import Path

import pytest
import yaml

from cfs_lightning.callbacks import load_task_yaml
from cfs_lightning.cli import main, run_cli
from cfs_lightning.generation import read_manifest

from .conftest import REPO

FIT_CONFIGS = ["configs/toy/pretrain.yaml", "configs/toy/finetune.yaml"]
OVERLAYS = {"configs/toy/plain.yaml": "configs/toy/finetune.yaml"}
FUNCTION_CONFIGS = {"configs/toy/init.yaml": "init", "configs/toy/generate.yaml": "generate",
                    "configs/toy/demo.yaml": "demo"}
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


@pytest.mark.parametrize("overlay", [[], ["configs/toy/plain.yaml"]])
def test_finetune_configs_fast_dev_run(overlay, tmp_path, monkeypatch, tiny_model_dir, tiny_replay_dir):
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
    assert ("train/reg/nll_replay" in metrics) == (not overlay)
    assert "eval/gsm8k_answers/bits_per_byte" in metrics
    assert (tmp_path / "hf" / "config.json").is_file()


def test_generate_command_writes_shards(tmp_path, tiny_model_dir):
    main(["generate", f"--model={tiny_model_dir}", f"--output_dir={tmp_path / 'r'}",
          "--budget.sequences=5", "--sampling.max_new_tokens=6", "--device=cpu"])
    assert read_manifest(tmp_path / "r")["num_sequences"] == 5
