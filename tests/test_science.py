"""One end-to-end science check: context-free replay really reduces forgetting.

A 2-layer x 64 Llama is pretrained on Shakespeare, then fine-tuned on GSM8K answers with and without
NLL replay of its own context-free samples. Plain fine-tuning must raise the held-out Shakespeare
loss clearly; replay must win most of it back while keeping most of the downstream gain.
"""

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.tasks import TaskSource
from cfs_lightning.sampling import Budget, SamplingConfig
from cfs_lightning.replay.context_free import generate_replay
from cfs_lightning.training.losses import token_nll
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.regularizers import NLLReplay
from cfs_lightning.experiments.init_model import init_model

from .conftest import GSM8K, SHAKESPEARE

SHAKESPEARE_TASK = dict(path="text", data_files={"train": str(SHAKESPEARE / "train.txt"),
                                                  "heldout": str(SHAKESPEARE / "heldout.txt")},
                        load_kwargs={"sample_by": "paragraph"}, prompt=None, response="{text}",
                        max_length=64)
GSM8K_TASK = dict(path="json", data_files={"train": str(GSM8K / "train.jsonl"), "test": str(GSM8K / "test.jsonl")},
                  prompt="Question: {question}\nAnswer:", response=" {answer}", max_length=192)


def _fit(model, datamodule, steps):
    L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(model, datamodule=datamodule)
    return model


def _nll(model, tok_dir, task: dict, split: str) -> float:
    dm = ReplayDataModule(TaskSource(**task, val_split=split), tokenizer=tok_dir, val_batch_size=64)
    dm.setup("validate")
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader()[0]:
            b = batch["task"]
            s, n = token_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            total, count = total + s.item(), count + n.item()
    return total / count


def _finetune(base_dir, replay_dir, regularizers, ratio):
    L.seed_everything(1)
    model = CausalLMFineTuner(base_dir, regularizers=regularizers,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    dm = ReplayDataModule(TaskSource(**GSM8K_TASK, split="train[:1280]"), tokenizer=base_dir, batch_size=16,
                          replay_ratio=ratio, replay=ReplayConfig(dir=replay_dir, val_size=0), seed=1)
    return _fit(model, dm, 80).model


@pytest.mark.slow
def test_context_free_replay_recovers_forgetting(tmp_path):
    init = init_model(str(tmp_path / "init"), [str(SHAKESPEARE / "train.txt")], vocab_size=512, seed=0,
                      model_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=256, tie_word_embeddings=False))
    L.seed_everything(0)
    model = CausalLMFineTuner(str(init), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
    _fit(model, ReplayDataModule(TaskSource(**SHAKESPEARE_TASK), tokenizer=str(init), batch_size=32), 300)
    base_dir = str(tmp_path / "base")
    model.model.save_pretrained(base_dir)
    model.tokenizer.save_pretrained(base_dir)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    generate_replay(base, AutoTokenizer.from_pretrained(base_dir), tmp_path / "replay",
                    SamplingConfig(max_new_tokens=64, batch_size=128, seed=0), Budget(sequences=640))

    replay = str(tmp_path / "replay")
    plain = _finetune(base_dir, replay, [], 0.0)
    cfs = _finetune(base_dir, replay, [NLLReplay()], 0.5)

    retained = {name: _nll(m, base_dir, SHAKESPEARE_TASK, "heldout[:300]")
                for name, m in (("base", base), ("plain", plain), ("cfs", cfs))}
    downstream = {name: _nll(m, base_dir, GSM8K_TASK, "test[:160]")
                  for name, m in (("base", base), ("plain", plain), ("cfs", cfs))}
    forgetting = retained["plain"] - retained["base"]
    recovered = (retained["plain"] - retained["cfs"]) / forgetting
    gain_kept = (downstream["base"] - downstream["cfs"]) / (downstream["base"] - downstream["plain"])
    print(f"retained {retained}, downstream {downstream}, recovered {recovered:.2f}, kept {gain_kept:.2f}")
    assert forgetting >= 0.5, retained
    assert recovered >= 0.5, retained
    assert gain_kept >= 0.85, downstream
