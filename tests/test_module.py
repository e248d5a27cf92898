import lightning as L
import pytest
import torch

from cfs_lightning.streams import REPLAY, StreamProducer
from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.tasks import TaskSource
from cfs_lightning.training import CausalLMFineTuner, CFSFineTuner
from cfs_lightning.training.losses import chunked_target_mean
from cfs_lightning.training.regularizers import EMA, KLToReference, L2ToInit, NLLReplay, Regularizer


def _per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) next-token NLL from whole logits (0 without a target) and the target mask."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    values = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                               ignore_index=IGNORE_INDEX, reduction="none")
    return values, targets != IGNORE_INDEX


def test_nll_replay_matches_float64_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    batch = {"replay": {"input_ids": ids, "attention_mask": mask, "labels": labels}}
    got = NLLReplay()(batch, {"replay": logits})
    logp = logits.log_softmax(-1)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t + 1]:
                total -= logp[b, t, ids[b, t + 1]].item()
                count += 1
    assert count == 5 + 3 + 1
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(total / count, rel=1e-12)


def test_sequence_normalization_sums_each_sequence_and_averages_over_sequences():
    """`normalize: sequence` is the CFS objective's expectation over sequences: a term summed
    over each sequence's target tokens, averaged over the sequences that have any."""
    torch.manual_seed(0)
    logits, ref = torch.randn(4, 6, 11, dtype=torch.float64), torch.randn(4, 6, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (4, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] + [0] * 5])  # row 3: no target
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    batch = {"replay": {"input_ids": ids, "attention_mask": mask, "labels": labels}}
    logp, logq = ref.log_softmax(-1), logits.log_softmax(-1)
    nll = [-sum(logq[b, t, ids[b, t + 1]].item() for t in range(5) if mask[b, t + 1]) for b in range(4)]
    kl = [sum((logp[b, t].exp() * (logp[b, t] - logq[b, t])).sum().item() for t in range(5) if mask[b, t + 1])
          for b in range(4)]
    reg, per_token = NLLReplay(), NLLReplay()
    reg.normalize = "sequence"
    assert reg(batch, {"replay": logits}).item() == pytest.approx(sum(nll) / 3, rel=1e-12)  # 3 rows have targets
    assert per_token(batch, {"replay": logits}).item() == pytest.approx(sum(nll) / 9, rel=1e-12)  # 5 + 3 + 1 tokens
    from cfs_lightning.training.losses import token_divergence

    got = chunked_target_mean(token_divergence, labels, logits, ref, chunk_size=2, per="sequence")
    assert got.item() == pytest.approx(sum(kl) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="normalize must be one of"):
        chunked_target_mean(token_divergence, labels, logits, ref, per="batch")


def test_the_module_normalizes_the_task_loss_and_every_term_alike(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    with pytest.raises(ValueError, match="model.normalize must be one of"):
        CausalLMFineTuner(str(tiny_model_dir), normalize="tokens")
    reg = NLLReplay()
    model = CausalLMFineTuner(str(tiny_model_dir), regularizers=[reg], normalize="sequence",
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                for stream in ("task", "replay"):
                    b = batch[stream]
                    logits = pl_module(b["input_ids"], b["attention_mask"])
                    values, targets = _per_token_nll(logits, b["labels"])
                    seen[stream] = ((values * targets).sum() / targets.any(-1).sum()).item()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: v.item() for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()],
                        limit_val_batches=0)
    trainer.fit(model, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir))
    assert reg.normalize == "sequence"  # set by the module before the regularizer's setup
    assert seen["train/task_loss"] == pytest.approx(seen["task"], rel=1e-5)
    assert seen["train/reg/nll_replay"] == pytest.approx(seen["replay"], rel=1e-5)
    assert seen["train/reg/nll_replay"] > 20  # nats per sequence, not per token


def test_regularizer_names_default_and_must_be_unique(tiny_model_dir):
    assert NLLReplay().name == "nll_replay"
    with pytest.raises(ValueError, match="unique"):
        CausalLMFineTuner(str(tiny_model_dir), regularizers=[NLLReplay(), NLLReplay()])
    with pytest.raises(ValueError, match="weight"):
        NLLReplay(weight=-1)


class Spy(Regularizer):
    """Records its lifecycle calls; its term is the mean squared replay logit over target tokens."""

    streams = ("replay",)

    def __init__(self, weight=1.0, name=None):
        super().__init__(weight, name)
        self.calls = []

    def setup(self, module):
        self.calls.append("setup")

    def __call__(self, batch, outputs):
        self.calls.append("call")
        return chunked_target_mean(lambda z: z.pow(2).mean(-1), batch["replay"]["labels"], outputs["replay"])

    def on_after_optimizer_step(self, module):
        self.calls.append("step")


def _datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0.5):
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Q: {question}\nA:",
                      response=" {answer}", val_split="test", max_length=512)
    return ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=4, replay_ratio=ratio,
                            val_batch_size=8,
                            replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=8))


def test_terms_are_weighted_summed_and_logged(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    spy = Spy(weight=0.25)
    model = CFSFineTuner(str(tiny_model_dir), replay_weight=2.0, regularizers=[spy])
    assert [type(r) for r in model.regularizers] == [NLLReplay, Spy]
    logged = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: v.item() for k, v in trainer.callback_metrics.items()})
            logged["returned"] = outputs["loss"].item()

    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()],
                        limit_val_batches=2)
    dm = _datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir)
    trainer.fit(model, datamodule=dm)
    assert spy.calls[0] == "setup" and spy.calls.count("step") == 2 and spy.calls.count("call") == 2
    expected = logged["train/task_loss"] + 2.0 * logged["train/reg/nll_replay"] + 0.25 * logged["train/reg/spy"]
    assert logged["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["returned"] == pytest.approx(logged["train/loss"], rel=1e-5)
    assert logged["train/reg/nll_replay"] > 0 and logged["train/reg/spy"] > 0
    metrics = {k: v for d in trainer.validate(model, datamodule=dm, verbose=False) for k, v in d.items()}
    assert set(metrics) == {"val/task_loss", "val/replay_nll", "val/replay_kl"}  # meter: cached top-8
    # val/replay_nll is the token-weighted NLL of the held-out replay sequences
    replay_val = next(iter(dm.val_dataloader()[1]))["replay"]
    with torch.no_grad():
        values, targets = _per_token_nll(model(replay_val["input_ids"], replay_val["attention_mask"]),
                                         replay_val["labels"])
    assert metrics["val/replay_nll"] == pytest.approx((values.sum() / targets.sum()).item(), rel=1e-5)


def test_replay_term_changes_the_gradient(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    """With the same seed, the replay term must move the weights differently."""
    def train(regs):
        L.seed_everything(0)
        model = CausalLMFineTuner(str(tiny_model_dir), regularizers=regs)
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
            model, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0.5 if regs else 0))
        return model.model.lm_head.weight.detach().clone()

    assert not torch.allclose(train([]), train([NLLReplay()]))


def test_missing_replay_stream_names_the_fix(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    model = CFSFineTuner(str(tiny_model_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(KeyError, match="replay_ratio > 0"):
        trainer.fit(model, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0))


@pytest.mark.parametrize("regularizers", [[], [L2ToInit(), EMA()], [KLToReference(on="task")]],
                         ids=["plain", "l2+ema", "kl-on-task"])
def test_replay_that_no_term_reads_is_refused(regularizers, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    model = CausalLMFineTuner(str(tiny_model_dir), regularizers=regularizers)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"data.replay_ratio=0.5 adds a `replay` stream to every training "
                                         r"batch, but no regularizer reads it .* add NLLReplay"):
        trainer.fit(model, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir))
    assert trainer.global_step == 0


def test_model_trains_in_train_mode(tiny_model_dir):
    assert CausalLMFineTuner(str(tiny_model_dir)).model.training


def test_readme_preset_subclass_runs_from_the_cli(tmp_path, monkeypatch, tiny_model_dir, tiny_replay_dir):
    """The README's subclassing example is real code: import it as a module and fit with it."""
    import re

    from cfs_lightning.experiments.runner import run_cli
    from cfs_lightning.training.regularizers import L2ToInit

    from .conftest import REPO

    readme = (REPO / "docs/methods.md").read_text()
    code = re.search(r"<!-- preset-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_presets.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    cli = run_cli(["fit", "--config", "configs/toy/base/finetune.yaml", "--model", "my_presets.ReplayL2FineTuner",
                   "--model.l2_weight", "0.05", "--trainer.fast_dev_run=1", "--trainer.callbacks=[]",
                   f"--model.pretrained={tiny_model_dir}", f"--data.init_args.replay.dir={tiny_replay_dir}",
                   "--data.init_args.replay.val_size=8", f"--trainer.logger.init_args.save_dir={tmp_path}",
                   f"--export.dirpath={tmp_path / 'hf'}"])
    regs = cli.model.regularizers
    assert [type(r).__name__ for r in regs] == ["NLLReplay", "L2ToInit"]
    assert isinstance(regs[1], L2ToInit) and regs[1].weight == 0.05
    assert {"train/reg/nll_replay", "train/reg/l2_to_init"} <= set(cli.trainer.callback_metrics)


class TwoRows(L.Callback, StreamProducer):
    """A producer as small as one can be: two fixed rows added to every batch's replay stream."""

    streams = (REPLAY,)

    def __init__(self):
        self.steps = []

    def rows(self, batch, step, module):
        self.steps.append(step.global_step)
        ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
        mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
        return {REPLAY: {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}}


def test_a_producer_callback_adds_rows_that_the_module_merges(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    seen = []

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: v.clone() for k, v in batch[REPLAY].items()})

    producer = TwoRows()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[producer, Capture()])
    trainer.fit(CFSFineTuner(str(tiny_model_dir)), datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir))
    assert producer.steps == [0, 1] and trainer.callback_metrics["train/reg/nll_replay"].isfinite()
    for batch in seen:  # the DataModule's 2 cached rows, then the producer's 2, padded alike
        assert batch["input_ids"].size(0) == 4 and "topk_ids" not in batch
        assert batch["input_ids"][3, :3].tolist() == [5, 6, 7] and batch["labels"][3, 3:].eq(IGNORE_INDEX).all()
    plain = CausalLMFineTuner(str(tiny_model_dir))  # no term reads replay
    with pytest.raises(ValueError, match=r"TwoRows adds a `replay` stream .* or remove TwoRows"):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[TwoRows()]).fit(
            plain, datamodule=_datamodule(tiny_model_dir, tiny_task_files, tiny_replay_dir, ratio=0))
