"""Online replay (regenerated during the fit) and sequential continual fine-tuning."""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.callbacks import OnlineReplay
from cfs_lightning.callbacks.online_replay import task_prompts
from cfs_lightning.experiments.continual import Stage, continual, summarize
from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.experiments.continual import FreshReplay
from cfs_lightning.experiments.runs import DONE
from cfs_lightning.tasks import TaskSource
from cfs_lightning.sampling import SamplingConfig, sample_context_free
from cfs_lightning.shards import read_manifest
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training.producers import merge_batches
from cfs_lightning.training.regularizers import KLFromCachedTopK, KLToReference, NLLReplay

from .conftest import REPO, make_eos_prone


class Capture(L.Callback):
    """Keeps the replay stream of every training batch as the step read it (the module merges the
    producers' rows in at the batch's start, after the callbacks' hooks), and the task stream."""

    def __init__(self, stream: str = "replay") -> None:
        self.stream, self.replay, self.task = stream, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.replay.append({k: v.clone() for k, v in batch[self.stream].items()})
        self.task.append({k: v.clone() for k, v in batch["task"].items()})


def _fit(tiny_model_dir, tiny_task_files, callbacks, replay_ratio=0.0, replay=None, steps=5, regularizers=None,
         **trainer_args):
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", max_length=128)
    dm = ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=2, replay_ratio=replay_ratio, replay=replay)
    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=regularizers or [NLLReplay()])
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        limit_val_batches=0, **trainer_args)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_online_replay_regenerates_from_the_frozen_initial_model(tiny_model_dir, tiny_task_files):
    cfg = SamplingConfig(max_new_tokens=8, batch_size=3, seed=7)
    online, capture = OnlineReplay(every_n_steps=2, num_sequences=3, batch_size=2, sampling=cfg), Capture()
    trainer = _fit(tiny_model_dir, tiny_task_files, [online, capture])
    assert online.rounds == 3 and len(capture.replay) == 5  # steps 0-1, 2-3, 4
    base, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    for step, batch in enumerate(capture.replay):
        r = step // 2
        pool = [x["input_ids"] for b in sample_context_free(base, tok, dataclasses.replace(cfg, seed=7 * 1_000_003 + r), 3, None)
                for x in b]
        expected = [pool[((step % 2) * 2 + j) % 3] for j in range(2)]
        got = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        assert got == expected  # sampled from the initial weights, not the weights being trained
    assert trainer.callback_metrics["train/reg/nll_replay"].isfinite()


def test_online_replay_joins_cached_replay(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    online = OnlineReplay(every_n_steps=10, num_sequences=4, batch_size=3, sampling=SamplingConfig(max_new_tokens=6))
    capture = Capture()
    _fit(tiny_model_dir, tiny_task_files, [online, capture], replay_ratio=1.0,
         replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=0), steps=2)
    assert [b["input_ids"].size(0) for b in capture.replay] == [2 + 3, 2 + 3]  # cached + online rows
    cached = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
              "labels": torch.ones(1, 2, dtype=torch.long), "topk_ids": torch.zeros(1, 2, 4)}
    fresh = {k: torch.full((2, 3), 5) for k in ("input_ids", "attention_mask", "labels")}
    merged = merge_batches(cached, fresh, pad_id=0)
    assert merged.keys() == fresh.keys() and merged["labels"][0].tolist() == [1, 1, -100]
    assert merged["input_ids"][0].tolist() == [1, 1, 0] and merged["attention_mask"][0].tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match=r"KLFromCachedTopK needs topk_ids, topk_logprobs on every `replay` row, "
                                         r"but the OnlineReplay callback \(stream: replay\) adds rows without them"):
        _fit(tiny_model_dir, tiny_task_files, [online], replay_ratio=1.0,
             replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=0), regularizers=[KLFromCachedTopK()])
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        OnlineReplay(every_n_steps=0, num_sequences=1, batch_size=1)


class BiasReference(L.Callback):
    """Makes the frozen reference (built when the fit sets up) say token `token` almost surely."""

    def __init__(self, token: int) -> None:
        self.token = token

    def on_fit_start(self, trainer, pl_module):
        make_eos_prone(pl_module.reference.model, self.token, bias=50.0)


class BiasAfterFirstStep(L.Callback):
    """After step 0, makes the trainable model say token `token` almost surely."""

    def __init__(self, token: int) -> None:
        self.token = token

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            make_eos_prone(pl_module.hf_model, self.token, bias=50.0)


def test_on_policy_samples_come_from_the_current_weights(tiny_model_dir, tiny_task_files):
    """The base is made to say X, the trainable model Y from step 1 on: on-policy responses show
    neither at step 0 and only Y after, so they come from the live weights, not the base."""
    x, y = 40, 41
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", max_length=128)
    dm = ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=2, replay_ratio=0.0)
    module = CausalLMFineTuner(str(tiny_model_dir), reference="copy",
                               regularizers=[KLToReference(on="onpolicy", direction="reverse")],
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    cfg = SamplingConfig(max_new_tokens=6, batch_size=4, seed=3)
    online = OnlineReplay(every_n_steps=1, num_sequences=3, batch_size=3, sampling=cfg, sampler="trainable",
                          prompts="task", stream="onpolicy")
    assert not online.needs_reference  # the KL term asks for the reference, not the sampler
    capture = Capture("onpolicy")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[BiasReference(x), online, BiasAfterFirstStep(y), capture])
    trainer.fit(module, datamodule=dm)
    assert online.rounds == 3 and trainer.callback_metrics["train/reg/kl_to_reference"] > 1.0
    for step, (rows, task_batch) in enumerate(zip(capture.replay, capture.task)):
        prompts = task_prompts(task_batch)
        for i, (ids, mask, labels) in enumerate(zip(rows["input_ids"], rows["attention_mask"], rows["labels"])):
            ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
            prompt = prompts[i % len(prompts)]  # the step's prompts, cycled to num_sequences
            response = ids[len(prompt):]
            assert ids[:len(prompt)] == prompt and labels == [IGNORE_INDEX] * len(prompt) + response
            assert x not in response  # never the base's token
            assert (response == [y] * 6) == (step > 0)  # the live weights' token, once they say it
    # the same set-up with the base as the sampler says X: the bias is there to be seen
    ref_online = OnlineReplay(every_n_steps=1, num_sequences=3, batch_size=3, sampling=cfg, prompts="task",
                              stream="onpolicy")
    batch = {"task": capture.task[0]}
    pool = ref_online._refill(module, batch, cfg.seed * 1_000_003)
    assert all(r["input_ids"][-6:] == [x] * 6 for r in pool)


def rows_of(batch: dict) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_accumulated_micro_batches_get_rows_of_their_own(tiny_model_dir, tiny_task_files):
    """With accumulate_grad_batches=2 the two micro-batches of a step read different pools; a
    pool of task prompts is sampled from its own micro-batch's prompts."""
    cfg = SamplingConfig(max_new_tokens=6, batch_size=4, seed=3)
    online, capture = OnlineReplay(every_n_steps=2, num_sequences=4, batch_size=2, sampling=cfg), Capture()
    _fit(tiny_model_dir, tiny_task_files, [online, capture], steps=2, accumulate_grad_batches=2)
    assert online.rounds == 2 and len(capture.replay) == 4  # micro-batches 0-3: steps 0, 0, 1, 1
    rows = [rows_of(b) for b in capture.replay]
    assert not set(map(tuple, rows[0])) & set(map(tuple, rows[1]))  # step 0: one pool per micro-batch
    assert rows[2] != rows[0] and rows[3] != rows[1]  # step 1 reads on in each pool
    assert {tuple(r) for r in rows[0] + rows[2]} == {tuple(r["input_ids"]) for r in online._pools[0]}

    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", max_length=128)
    dm = ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=2)
    module = CausalLMFineTuner(str(tiny_model_dir), reference="copy",
                               regularizers=[KLToReference(on="onpolicy", direction="reverse")])
    policy = OnlineReplay(every_n_steps=1, num_sequences=2, batch_size=2, sampling=cfg, sampler="trainable",
                          prompts="task", stream="onpolicy")
    capture = Capture("onpolicy")
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accumulate_grad_batches=2,
              callbacks=[policy, capture]).fit(module, datamodule=dm)
    assert policy.rounds == 4
    for online_rows, task_batch in zip(capture.replay, capture.task):
        prompts = task_prompts(task_batch)
        assert [r[:len(p)] for r, p in zip(rows_of(online_rows), prompts)] == prompts  # its own prompts


def test_online_rows_that_no_term_reads_are_refused(tiny_model_dir, tiny_task_files):
    cfg = SamplingConfig(max_new_tokens=4, batch_size=2)
    onpolicy = OnlineReplay(every_n_steps=1, num_sequences=2, batch_size=2, sampling=cfg, sampler="trainable",
                            prompts="task", stream="onpolicy")
    with pytest.raises(ValueError, match=r"OnlineReplay callback \(stream: onpolicy\) adds a `onpolicy` stream .* "
                                         r"add KLToReference \(on: onpolicy\) or SelfDistillation"):
        _fit(tiny_model_dir, tiny_task_files, [onpolicy], steps=1)  # NLLReplay reads replay only
    teacher = OnlineReplay(every_n_steps=1, num_sequences=2, batch_size=2, sampling=cfg, sampler="trainable",
                           prompts="task", stream="onpolicy", demonstrations=True)
    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference(on="onpolicy")])
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", max_length=128)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[teacher])
    with pytest.raises(ValueError, match="`onpolicy_teacher` stream .* add SelfDistillation"):
        trainer.fit(module, datamodule=ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=2))
    assert teacher.rounds == 0  # refused before anything was sampled


def test_on_policy_options_are_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="OnlineReplay.sampler must be 'reference' or 'trainable'"):
        OnlineReplay(every_n_steps=1, num_sequences=1, batch_size=1, sampler="student")
    with pytest.raises(ValueError, match="OnlineReplay.stream must be 'replay' or 'onpolicy'"):
        OnlineReplay(every_n_steps=1, num_sequences=1, batch_size=1, stream="task")
    no_prompt = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])}
    with pytest.raises(ValueError, match="needs prompt-response task data"):
        task_prompts(no_prompt)
    module = CausalLMFineTuner(str(tiny_model_dir), regularizers=[KLToReference(on="onpolicy")])
    batch = {"task": {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}}
    with pytest.raises(KeyError, match="OnlineReplay\\(sampler: trainable, prompts: task, stream: onpolicy\\)"):
        module.training_step(batch, 0)  # a batch without the stream a term reads


def test_summary_reports_average_and_backward_transfer():
    stages = [Stage("a", TaskSource(), "ta"), Stage("b", TaskSource(), "tb"), Stage("c", TaskSource(), "tc")]
    better = {"ta/bits_per_byte": False, "tb/bits_per_byte": False, "tc/bits_per_byte": False}
    rows = [[2.0, 5.0, 6.0], [3.0, 1.5, 6.0], [3.5, 2.5, 1.0]]
    results = [{"before": None, "higher_is_better": better,
                "after": {f"eval/t{n}/bits_per_byte": v for n, v in zip("abc", row)}} for row in rows]
    report = summarize(stages, results)
    assert report["matrix"] == rows
    assert report["average"] == pytest.approx((3.5 + 2.5 + 1.0) / 3)
    assert report["bwt"] == pytest.approx(-((3.5 - 2.0) + (2.5 - 1.5)) / 2)  # lower is better: a rise is forgetting
    for r in results:
        r["higher_is_better"] = dict.fromkeys(better, True)
    assert summarize(stages, results)["bwt"] == pytest.approx(((3.5 - 2.0) + (2.5 - 1.5)) / 2)


def test_continual_runs_stages_in_order_with_fresh_and_kept_replay(tmp_path, monkeypatch, tiny_model_dir,
                                                                   tiny_task_files, tiny_replay_dir):
    monkeypatch.chdir(REPO)

    def stage(name, prompt, response, eval_task):
        task = TaskSource(path="json", data_files=tiny_task_files, split="train[:16]", prompt=prompt,
                          response=response, max_length=128)
        return Stage(name, task, eval_task)

    stages = [stage("answers", "Question: {question}\nAnswer:", " {answer}", "configs/tasks/gsm8k_answers.yaml"),
              stage("questions", "Answer: {answer}\nQuestion:", " {question}", "configs/tasks/gsm8k_questions.yaml")]
    fresh = FreshReplay("configs/toy/data/cfs.yaml", {"budget.sequences": 8, "sampling.max_new_tokens": 8,
                                                      "sampling.batch_size": 8, "sampling.seed": 1, "store_topk": 0})
    kwargs = dict(fit_configs=["configs/toy/base/finetune.yaml", "configs/toy/methods/cfs-nll.yaml"], stages=stages,
                  output_dir=str(tmp_path / "c"), retained_tasks=["configs/tasks/shakespeare_heldout.yaml"],
                  fresh_replay=fresh, keep_replay=True, eval_batch_size=4, eval_limit=4,
                  fit_args=["--trainer.max_steps=2", f"--model.init_args.pretrained={tiny_model_dir}",
                            f"--data.init_args.replay.dir={tiny_replay_dir}", "--data.init_args.replay.val_size=4",
                            "--data.init_args.batch_size=4"])
    report = continual(**kwargs)
    first, second = tmp_path / "c" / "01-answers", tmp_path / "c" / "02-questions"
    assert read_manifest(second / "replay_fresh")["model"] == str(first / "hf_model")  # sampled from stage 1's end
    merged = read_manifest(second / "replay")
    assert merged["parts"] == [str(tiny_replay_dir), str(second / "replay_fresh")]
    assert merged["num_sequences"] == read_manifest(tiny_replay_dir)["num_sequences"] + 8
    saved = json.loads((second / DONE).read_text())
    assert saved["replay"] == str(second / "replay")
    hparams = (second / "logs" / "hparams.yaml").read_text()
    assert str(first / "hf_model") in hparams  # stage 2 starts where stage 1 ended
    assert report["tasks"] == ["gsm8k_answers/bits_per_byte", "gsm8k_questions/bits_per_byte"]
    m = report["matrix"]
    assert len(m) == 2 and report["bwt"] == pytest.approx(-(m[1][0] - m[0][0]))
    assert "shakespeare_heldout/bits_per_byte" in report["table"] and "| base |" in report["table"]
    assert continual(**kwargs)["matrix"] == m  # finished stages are skipped, not rerun
