"""The second toy world (configs/toy2) runs end to end at a tiny scale: a GPT-2 whose tokenizer's
one special token is both BOS and EOS, pretrained on Python source, fine-tuned on number words
with and without context-free replay, both of its lm-eval tasks measured."""

import json

import pytest

from transformers import AutoTokenizer

from cfs_lightning.experiments.study import DataStep, Method, study
from cfs_lightning.experiments.toy_base import BUILD, build_base
from cfs_lightning.shards import load_shards

from .conftest import REPO


@pytest.mark.slow
def test_the_second_world_builds_samples_fits_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    base = build_base(tmp_path / "base", "configs/toy2/base/init.yaml", "configs/toy2/base/pretrain.yaml",
                      ["--trainer.max_steps=4", "--trainer.enable_progress_bar=false"])
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.pad_token is None
    assert json.loads((base / "config.json").read_text())["model_type"] == "gpt2"
    assert json.loads((base / BUILD).read_text())["configs"]["configs/toy2/base/init.yaml"]
    out = tmp_path / "study"
    summary = study(
        base=str(base), fit_config="configs/toy2/base/finetune.yaml", retained="code_heldout/bits_per_byte",
        downstream="number_words/bits_per_byte", output_dir=str(out), seeds=[0],
        fit_args=["--data.init_args.task.split=train[:32]", "--data.init_args.task.val_split=test[:8]",
                  "--data.init_args.batch_size=8", "--trainer.callbacks.init_args.limit=4",
                  "--trainer.callbacks.init_args.batch_size=4", "--trainer.enable_progress_bar=false",
                  "--data.init_args.replay.dir={data.cfs}", "--data.init_args.replay.val_size=4"],
        data=[DataStep("cfs", "generate", "configs/toy2/data/cfs.yaml",
                       {"budget.sequences": 12, "sampling.max_new_tokens": 12, "sampling.batch_size": 6})],
        methods=[Method("ft", ["configs/toy/methods/ft.yaml"]), Method("cfs-kl", ["configs/toy/methods/cfs-kl.yaml"])],
        report_dir=str(tmp_path / "report"))
    rows = load_shards(out / "data" / "cfs")
    # every context-free sample starts from the start token alone, which is also the stop token
    assert all(r[0] == tok.bos_token_id for r in rows["input_ids"])
    assert set(summary["methods"]) == {"ft", "cfs-kl"}
    for method in summary["methods"].values():
        assert method["retained"] > 0 and method["downstream"] > 0
