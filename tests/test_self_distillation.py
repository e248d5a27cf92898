"""SDFT (`SelfDistillation` and the teacher's view `OnlineReplay(demonstrations: true)` builds)
against float64 maths, the real Llama-3.1 tokenizer's BOS, and in a fit."""

import copy

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer

from cfs_lightning.callbacks import OnlineReplay
from cfs_lightning.callbacks.online_replay import task_prompts, teacher_view
from cfs_lightning.data import ReplayDataModule
from cfs_lightning.sampling import SamplingConfig
from cfs_lightning.tasks import TaskSource
from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.heads import split_logits
from cfs_lightning.training.reference import FrozenReference
from cfs_lightning.training.regularizers import SelfDistillation

from .families import real_tokenizer
from .test_online_continual import Capture


def _rows(vocab: int) -> tuple[dict, dict]:
    """Two student rows (prompt, response) and their teacher views (a demonstration first)."""
    g = torch.Generator().manual_seed(0)
    students, teachers = [], []
    for n_prompt, n_resp, n_demo in ((3, 4, 5), (2, 3, 7)):
        ids = torch.randint(3, vocab, (n_prompt + n_resp,), generator=g).tolist()
        demo = torch.randint(3, vocab, (n_demo,), generator=g).tolist()
        students.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
        view = teacher_view(demo, ids, n_prompt, bos_id=None)
        teachers.append({"input_ids": view["teacher_input_ids"], "labels": view["teacher_labels"]})
    from cfs_lightning.data import Collator
    return Collator(0)(students), Collator(0)(teachers)


def _by_hand(student_logits, teacher_logits, s_labels, t_labels, direction="reverse", skip=0) -> float:
    """Mean over response tokens of the KL between the two next-token distributions, float64."""
    def positions(labels):
        out = []
        for b in range(labels.size(0)):
            pos = [t for t in range(labels.size(1) - 1) if labels[b, t + 1] != IGNORE_INDEX]
            out.append(pos[skip:])
        return out
    total, n = 0.0, 0
    for b, (sp, tp) in enumerate(zip(positions(s_labels), positions(t_labels), strict=True)):
        for s, t in zip(sp, tp, strict=True):
            logq = student_logits[b, s].double().log_softmax(-1)
            logp = teacher_logits[b, t].double().log_softmax(-1)
            a, c = (logq, logp) if direction == "reverse" else (logp, logq)
            total += float((a.exp() * (a - c)).sum())
            n += 1
    return total / n


@pytest.mark.parametrize("teacher,direction,skip", [("base", "reverse", 0), ("base", "forward", 1), ("live", "reverse", 0)])
def test_sdft_term_is_the_kl_to_the_demonstration_conditioned_teacher(tiny_model, teacher, direction, skip):
    base = tiny_model
    student_model = copy.deepcopy(base)
    with torch.no_grad():
        for p in student_model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    student, teach = _rows(base.config.vocab_size)
    reg = SelfDistillation(teacher=teacher, direction=direction, skip_tokens=skip, chunk_size=2)
    module = _Module(student_model, FrozenReference(base, "copy"))
    reg.setup(module)
    logits = module(student["input_ids"], student["attention_mask"])
    got = reg({"onpolicy": student, "onpolicy_teacher": teach},
              {"onpolicy": module.logits(student["input_ids"], student["attention_mask"])})
    with torch.no_grad():
        teacher_model = base if teacher == "base" else student_model
        t_logits = teacher_model(input_ids=teach["input_ids"], attention_mask=teach["attention_mask"]).logits
    expected = _by_hand(logits.detach(), t_logits, student["labels"], teach["labels"], direction, skip)
    assert expected > 1e-3
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()  # the student side takes the gradient; the teacher's side none
    assert student_model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in base.parameters())


class _Module(torch.nn.Module):
    """What SelfDistillation reads of CausalLMFineTuner: `model`, `reference`, and its `logits`."""

    def __init__(self, model, reference=None) -> None:
        super().__init__()
        self.model, self.reference = model, reference

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def logits(self, input_ids, attention_mask):
        return split_logits(self.model, self.model, input_ids, attention_mask)


def test_the_live_teacher_runs_in_eval_mode_and_the_student_stays_in_train_mode(tiny_model):
    """With attention dropout 0.5, a teacher pass in train mode would be random; the live teacher
    must be the eval-mode network (dropout off), as TRL runs its teacher."""
    model = copy.deepcopy(tiny_model)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with torch.no_grad():  # peakier distributions: a divergence of a nat or so, not 1e-3
        model.lm_head.weight.mul_(30)
    student, teach = _rows(model.config.vocab_size)
    reg = SelfDistillation(teacher="live", chunk_size=2)
    module = _Module(model.eval())
    reg.setup(module)
    with torch.no_grad():
        logits = module(student["input_ids"], student["attention_mask"])
        t_logits = module(teach["input_ids"], teach["attention_mask"])
    expected = _by_hand(logits, t_logits, student["labels"], teach["labels"])
    assert expected > 0.05
    model.train()
    for _ in range(2):
        got = reg({"onpolicy": student, "onpolicy_teacher": teach}, {"onpolicy": logits})
        assert got.item() == pytest.approx(expected, rel=1e-5)
        assert model.training and all(m.training for m in model.modules())  # the student's mode, restored


def test_teacher_view_puts_the_demonstration_first_and_drops_the_second_bos(tmp_path):
    tok = AutoTokenizer.from_pretrained(real_tokenizer("llama3_1", tmp_path / "llama"))
    demo = tok("Q: 2+2? A: 4")["input_ids"]
    prompt = tok("Q: 3+3? A:")["input_ids"]
    assert prompt[0] == tok.bos_token_id  # Llama-3.1 starts every text with <|begin_of_text|>
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    response = tok(" 6", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    view = teacher_view(demo + sep, prompt + response, len(prompt), tok.bos_token_id)
    assert view["teacher_input_ids"] == demo + sep + prompt[1:] + response
    assert tok.decode(view["teacher_input_ids"]).count("<|begin_of_text|>") == 1
    targets = [y for y in view["teacher_labels"] if y != IGNORE_INDEX]
    assert targets == response and len(view["teacher_labels"]) == len(view["teacher_input_ids"])


def test_sdft_rows_in_a_fit_pair_each_sample_with_its_own_example(tiny_model_dir, tiny_task_files):
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", max_length=128)
    dm = ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=2, replay_ratio=0.0)
    module = CausalLMFineTuner(str(tiny_model_dir), task_loss=None, regularizers=[SelfDistillation()])
    online = OnlineReplay(every_n_steps=1, num_sequences=3, batch_size=3, sampler="trainable", prompts="task",
                          stream="onpolicy", demonstrations=True, sampling=SamplingConfig(max_new_tokens=5, seed=1))
    student, teacher = Capture("onpolicy"), Capture("onpolicy_teacher")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[online, student, teacher])
    trainer.fit(module, datamodule=dm)
    assert module.reference is not None  # the base teacher needs the frozen copy
    metrics = trainer.callback_metrics
    assert metrics["train/reg/self_distillation"] > 0 and "train/task_loss" in metrics
    sep = module.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for s_rows, t_rows, task_batch in zip(student.replay, teacher.replay, student.task, strict=True):
        prompts = task_prompts(task_batch)
        examples = [ids[m.bool()].tolist() for ids, m in zip(task_batch["input_ids"], task_batch["attention_mask"])]
        for i in range(3):
            ids = s_rows["input_ids"][i][s_rows["attention_mask"][i].bool()].tolist()
            t_ids = t_rows["input_ids"][i][t_rows["attention_mask"][i].bool()].tolist()
            j = i % len(prompts)
            assert ids[0] == module.tokenizer.bos_token_id  # the row's BOS is not repeated mid-row
            assert t_ids == examples[j] + sep + ids[1:]
            n = len(prompts[j])
            t_targets = [y for y in t_rows["labels"][i].tolist() if y != IGNORE_INDEX]
            assert t_targets == ids[n:]


def test_sdft_options_are_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="SelfDistillation.teacher must be one of"):
        SelfDistillation(teacher="ema")
    with pytest.raises(ValueError, match="demonstrations needs prompts: task and stream: onpolicy"):
        OnlineReplay(every_n_steps=1, num_sequences=1, batch_size=1, demonstrations=True)
    with pytest.raises(ValueError, match="task_loss: null leaves no loss"):
        CausalLMFineTuner(str(tiny_model_dir), task_loss=None)
    reg = SelfDistillation(teacher="live")
    assert not reg.needs_reference and SelfDistillation().needs_reference
    with pytest.raises(KeyError, match="demonstrations: true"):
        reg({"onpolicy": {}}, {})
