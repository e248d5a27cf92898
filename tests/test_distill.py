"""Distillation from any teacher with GKD's controls: `KLToReference(teacher=...)` against the
teacher's own logits by hand, `top_k` against the coarsened KL, and `OnlineReplay(lmbda=...)`
mixing on-policy and dataset steps."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.callbacks import OnlineReplay
from cfs_lightning.streams import ONPOLICY, TASK, StepContext
from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.losses import token_divergence
from cfs_lightning.training.regularizers import KLToReference, topk_forward_kl


@pytest.fixture
def teacher_dir(tmp_path, tiny_model_dir):
    """The tiny model with other weights and the same tokenizer: an 'earlier fine-tune'."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _by_hand(student, teacher, rows, per_position) -> float:
    """Mean over response positions of a divergence between the two models' whole logits."""
    with torch.no_grad():
        z, r = student(input_ids=rows["input_ids"]).logits, teacher(input_ids=rows["input_ids"]).logits
    valid = rows["labels"][:, 1:] != IGNORE_INDEX  # position t predicts t + 1
    return per_position(z[:, :-1][valid], r[:, :-1][valid]).mean().item()


@pytest.mark.parametrize("settings", [dict(beta=0.5), dict(direction="reverse"), dict(top_k=5), dict(top_k=None)])
def test_a_teacher_checkpoint_replaces_the_base_in_the_kl(settings, tiny_model_dir, teacher_dir):
    module = CausalLMFineTuner(str(tiny_model_dir))
    assert module.reference is None  # nothing needs the base: the teacher is the term's own
    term = KLToReference(on=ONPOLICY, teacher=str(teacher_dir), **settings)
    assert not term.needs_reference
    module.regularizers = [term]
    term.setup(module)
    rows = _batch(module.model.config.vocab_size)
    got = term({ONPOLICY: rows}, {ONPOLICY: module.logits(rows["input_ids"], rows["attention_mask"])}).item()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    if settings.get("top_k"):
        def per_position(z, r):
            top = r.log_softmax(-1).topk(settings["top_k"], dim=-1)
            return topk_forward_kl(z, top.indices, top.values)
    else:
        def per_position(z, r):
            return token_divergence(z, r, settings.get("direction", "forward"), settings.get("beta"))
    assert got == pytest.approx(_by_hand(module.model.eval(), teacher, rows, per_position), rel=1e-4)
    assert got > 0  # the teacher is not the base
    assert all(not p.requires_grad for p in term.reference.model.parameters())
    assert not term.reference.model.training
    assert not any(k.startswith("reference") for k in module.state_dict())  # never in a checkpoint


def test_top_k_of_all_tokens_but_one_is_the_forward_kl(tiny_model_dir, teacher_dir):
    """With one token left out, the rest is that token: nothing is coarsened."""
    module = CausalLMFineTuner(str(tiny_model_dir))
    rows = _batch(module.model.config.vocab_size)
    values = []
    for top_k in (module.model.config.vocab_size - 1, None):
        term = KLToReference(on=ONPOLICY, teacher=str(teacher_dir), top_k=top_k)
        term.setup(module)
        values.append(term({ONPOLICY: rows}, {ONPOLICY: module.logits(rows["input_ids"], rows["attention_mask"])}))
    assert values[0].item() == pytest.approx(values[1].item(), rel=1e-4)


def test_a_teacher_with_another_tokenizer_and_bad_settings_are_refused(tmp_path, tiny_model_dir, teacher_dir):
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tok.add_tokens(["<other>"])
    tok.save_pretrained(teacher_dir)
    module = CausalLMFineTuner(str(tiny_model_dir))
    with pytest.raises(ValueError, match="has another tokenizer than the model being fine-tuned"):
        KLToReference(teacher=str(teacher_dir)).setup(module)
    with pytest.raises(ValueError, match="top_k must be >= 1 and comes with the forward KL"):
        KLToReference(top_k=4, direction="reverse")
    with pytest.raises(ValueError, match="lmbda must be in \\[0, 1\\], and below 1 only for on-policy rows"):
        OnlineReplay(every_n_steps=1, num_sequences=2, batch_size=2, lmbda=0.5)  # context-free rows


def test_lmbda_mixes_on_policy_and_dataset_steps_reproducibly():
    replay = OnlineReplay(every_n_steps=1, num_sequences=2, batch_size=2, sampler="trainable", prompts=TASK,
                          stream=ONPOLICY, lmbda=0.3)
    steps = [StepContext(s, s, 1, 0, 1) for s in range(400)]
    on = [replay._on_policy(s) for s in steps]
    assert on == [replay._on_policy(s) for s in steps]  # the same draws again (a resumed fit)
    assert 0.24 < sum(on) / len(on) < 0.36
    task = _batch(50)
    dataset_step = steps[on.index(False)]
    rows = replay.rows({TASK: task}, dataset_step, module=None)  # no sampling on a dataset step
    assert rows[ONPOLICY] == {k: task[k] for k in ("input_ids", "attention_mask", "labels")}
    always = OnlineReplay(every_n_steps=1, num_sequences=2, batch_size=2, sampler="trainable", prompts=TASK,
                          stream=ONPOLICY)
    assert all(always._on_policy(s) for s in steps)
