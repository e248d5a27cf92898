"""The forgetting meter (`val/replay_kl`, `val/task_kl`) against float64 maths, and in a fit."""

import copy
import logging

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.meter import forgetting_kl
from cfs_lightning.training.reference import FrozenReference

from .test_module import _datamodule


def _batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[2, :4] = IGNORE_INDEX  # a prompt: no target there
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _moved(model: torch.nn.Module) -> torch.nn.Module:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return moved


def _kl_by_hand(base_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over target positions (t predicts labels[t + 1]) of KL(p_base || p) in float64."""
    total, n = 0.0, 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            logp, logq = base_logits[b, t].double().log_softmax(-1), logits[b, t].double().log_softmax(-1)
            total += float((logp.exp() * (logp - logq)).sum())
            n += 1
    return total / n


def test_meter_is_the_exact_kl_to_the_frozen_base(tiny_model):
    base, moved = tiny_model, _moved(tiny_model).eval()
    batch = _batch(base.config.vocab_size)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = moved(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _kl_by_hand(base_logits, logits, batch["labels"])
    got = forgetting_kl(logits, batch, FrozenReference(base, "copy"), chunk_size=4)
    assert expected > 0.01
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the base model itself has moved nowhere
    assert forgetting_kl(base_logits, batch, FrozenReference(base, "copy")).item() == pytest.approx(0, abs=1e-6)


def test_meter_falls_back_to_the_cached_topk_and_is_exact_when_k_is_the_vocabulary(tiny_model):
    base, moved = tiny_model, _moved(tiny_model).eval()
    batch = _batch(base.config.vocab_size, seed=1)
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = moved(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    exact = _kl_by_hand(base_logits, logits, batch["labels"])
    logprobs, ids = base_logits.double().log_softmax(-1).sort(-1, descending=True)
    whole = forgetting_kl(logits.double(), {**batch, "topk_ids": ids, "topk_logprobs": logprobs}, None)
    assert whole.item() == pytest.approx(exact, rel=1e-9)
    top4 = forgetting_kl(logits, {**batch, "topk_ids": ids[..., :4], "topk_logprobs": logprobs[..., :4]}, None)
    assert 0 < top4.item() < exact  # coarsening lowers a KL
    assert forgetting_kl(logits, batch, None) is None  # nothing to measure against


def test_fit_logs_the_meter_and_says_once_what_it_reads(tiny_model_dir, tiny_task_files, tiny_replay_dir, caplog):
    dm = _datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0)  # held-out replay only
    model = CausalLMFineTuner(str(tiny_model_dir), reference="copy",
                              optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    with caplog.at_level(logging.INFO, logger="cfs_lightning.training"):
        before = {k: v for d in trainer.validate(model, datamodule=dm, verbose=False) for k, v in d.items()}
        trainer.fit(model, datamodule=dm)
        after = {k: v for d in trainer.validate(model, datamodule=dm, verbose=False) for k, v in d.items()}
    assert set(before) == {"val/task_loss", "val/replay_nll", "val/task_kl", "val/replay_kl"}
    assert before["val/task_kl"] == pytest.approx(0, abs=1e-6)  # not trained yet: no divergence
    assert before["val/replay_kl"] == pytest.approx(0, abs=1e-6)
    assert after["val/task_kl"] > 1e-3 and after["val/replay_kl"] > 1e-3
    # the replay KL is the exact one on the held-out batches, token-weighted, computed by hand
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    total = n = 0
    for batch in list(dm.val_dataloader()[1])[:2]:
        b = batch["replay"]
        with torch.no_grad():
            base_logits = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits = model(b["input_ids"], b["attention_mask"])
        count = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total, n = total + _kl_by_hand(base_logits, logits, b["labels"]) * count, n + count
    assert after["val/replay_kl"] == pytest.approx(total / n, rel=1e-4)
    said = [r.getMessage() for r in caplog.records if "exact KL(p_base || p_theta)" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in said) == ["val/replay_kl", "val/task_kl"]  # once per stream


def test_meter_off_is_said_once(tiny_model_dir, tiny_task_files, tiny_replay_dir, caplog):
    model = CausalLMFineTuner(str(tiny_model_dir))
    dm = _datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=3)
    with caplog.at_level(logging.INFO, logger="cfs_lightning.training"):
        metrics = {k: v for d in trainer.validate(model, datamodule=dm, verbose=False) for k, v in d.items()}
        trainer.validate(model, datamodule=dm, verbose=False)
    assert "val/task_kl" not in metrics and "val/replay_kl" in metrics  # the tiny shards cache top-8
    lines = [r.getMessage() for r in caplog.records]
    assert sum("val/task_kl is off: no frozen reference" in m for m in lines) == 1
    assert sum("cached top-8 tokens" in m for m in lines) == 1
