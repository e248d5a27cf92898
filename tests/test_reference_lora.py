"""The frozen reference, regularizer state in checkpoints, and LoRA training and export."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cfs_lightning.callbacks import HFExport
from cfs_lightning.training.lora import LoRA
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.reference import ReferenceError
from cfs_lightning.training.regularizers import EMA, KLFromCachedTopK, KLToReference, L2ToInit, NLLReplay

from .test_module import _datamodule

LORA = LoRA(r=4, alpha=8, dropout=0.0)


def _trainer(max_steps, callbacks=(), **kw):
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks),
                     **{"enable_checkpointing": False, "limit_val_batches": 0, **kw})


class StepLog(L.Callback):
    def __init__(self):
        self.metrics = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: v.item() for k, v in trainer.callback_metrics.items()})


def test_reference_is_built_once_frozen_and_outside_the_module(tiny_model_dir):
    plain = CausalLMFineTuner(str(tiny_model_dir))
    plain.setup("validate")
    assert plain.reference is None
    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference()])
    assert module.reference is None  # built when the first fit or evaluation sets up, once
    module.setup("validate")
    built = module.reference
    module.setup("validate")
    assert module.reference is built
    ref = module.reference.model
    assert module.reference.mode == "copy" and ref is not module.model and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    own = {id(p) for p in module.parameters()}
    assert not any(id(p) in own for p in ref.parameters())
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}
    with pytest.raises(ReferenceError, match="reference='none'"):
        CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference()], reference="none")
    with pytest.raises(ReferenceError, match="needs LoRA"):
        CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference()], reference="adapters_disabled")
    lora = CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference()], lora=LORA)
    lora.setup("validate")
    assert lora.reference.mode == "adapters_disabled" and lora.reference.model is lora.model
    copied = CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference()], lora=LORA, reference="copy")
    copied.setup("validate")
    assert not isinstance(copied.reference.model, PeftModel)  # a plain copy: the zero adapters folded in
    ids = torch.arange(6).unsqueeze(0)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
        torch.testing.assert_close(copied.reference.model(input_ids=ids).logits, base)


@pytest.mark.parametrize("lora", [None, LORA], ids=["copy", "adapters_disabled"])
def test_kl_starts_at_zero_and_grows(lora, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    log = StepLog()
    module = CausalLMFineTuner(str(tiny_model_dir), lora=lora, regularizers=[
        KLToReference(name="kl_replay"), KLToReference(on="task", direction="reverse", name="kl_task")],
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    _trainer(4, [log]).fit(module, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir))
    first, last = log.metrics[0], log.metrics[-1]
    # step 1 runs at the initial weights: the model equals its reference
    assert first["train/reg/kl_replay"] == pytest.approx(0, abs=1e-6)
    assert first["train/reg/kl_task"] == pytest.approx(0, abs=1e-6)
    assert last["train/reg/kl_replay"] > 1e-4 and last["train/reg/kl_task"] > 1e-4
    if lora is not None:  # the reference is the base: the adapters are what moved
        with torch.no_grad(), module.model.disable_adapter():
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
            ids = torch.arange(6).unsqueeze(0)
            torch.testing.assert_close(module.model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_cached_topk_kl_trains_from_the_shards(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    log = StepLog()
    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLFromCachedTopK()],
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert module.reference is None  # no reference model in memory
    _trainer(2, [log]).fit(module, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir))
    assert log.metrics[0]["train/reg/kl_from_cached_top_k"] == pytest.approx(0, abs=1e-5)  # base vs its own cache
    assert log.metrics[-1]["train/reg/kl_from_cached_top_k"] > 1e-5


class Snapshot(L.Callback):
    """Copies of the EMA average and theta_0 at train start and after every batch."""

    def __init__(self):
        self.at_start, self.after = None, []

    @staticmethod
    def _state(pl_module):
        ema, l2 = pl_module.regularizers[1], pl_module.regularizers[2]
        return [a.clone() for a in ema.average], [p.clone() for p in l2.initial]

    def on_train_start(self, trainer, pl_module):
        self.at_start = self._state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after.append(self._state(pl_module))


def _stateful(tiny_model_dir):
    return CausalLMFineTuner(str(tiny_model_dir), regularizers=[
        NLLReplay(), EMA(decay=0.5), L2ToInit(weight=0.1), KLToReference()],
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def test_checkpoint_holds_no_reference_and_resumes_ema_and_theta0(
        tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    dm = _datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    snap = Snapshot()
    module = _stateful(tiny_model_dir)
    _trainer(3, [ckpt, snap], enable_checkpointing=True).fit(module, datamodule=dm)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()}
    n_trainable = sum(1 for p in module.model.parameters() if p.requires_grad)
    assert len(saved["optimizer_states"][0]["state"]) == n_trainable  # no reference, no theta_0
    assert set(saved["regularizers"]) == {"ema"}
    ema_2, theta0 = snap.after[1]
    assert not torch.equal(ema_2[0], snap.at_start[0][0])  # the average moved

    resumed = Snapshot()
    _trainer(3, [resumed]).fit(_stateful(tiny_model_dir), datamodule=dm, ckpt_path=tmp_path / "step=2.ckpt")
    for a, b in zip(resumed.at_start[0], ema_2):
        assert torch.equal(a, b)
    for a, b in zip(resumed.at_start[1], theta0):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="keeps state"):  # a stateful regularizer the checkpoint lacks
        _trainer(3).fit(CausalLMFineTuner(str(tiny_model_dir), regularizers=[EMA(name="other")]),
                        datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0),
                        ckpt_path=tmp_path / "step=2.ckpt")


def test_validation_sees_the_ema_weights(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    seen = []

    class Peek(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            seen.append(pl_module.model.lm_head.weight.detach().clone())

    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=[EMA(decay=0.5, final="live")],
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    _trainer(2, [Peek()], limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0).fit(
        module, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0))
    average = module.regularizers[0].average[-1]  # lm_head.weight is the last trainable tensor
    torch.testing.assert_close(seen[-1], average)
    assert not torch.allclose(module.model.lm_head.weight, average)  # final="live" kept the trained weights


def test_lora_trains_adapters_only_and_exports_merged_and_adapter(
        tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=[NLLReplay()], lora=LORA,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = _trainer(2, [HFExport(dirpath=str(tmp_path / "hf"))])
    trainer.fit(module, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    lora_params = {id(p) for n, p in module.model.named_parameters() if "lora_" in n}
    assert optimized == lora_params and lora_params
    ids = torch.arange(8).unsqueeze(0)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        assert not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            tmp_path / "hf" / "adapter")
        torch.testing.assert_close(adapter(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.allclose(base(input_ids=ids).logits, expected)  # the adapters did train
