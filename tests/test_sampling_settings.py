"""Every sampler draws from the model's raw softmax under the user's own `SamplingConfig`: nothing
of the checkpoint's generation_config.json reaches it, and the inverse CDF is exact in float64."""

from __future__ import annotations

import math
import shutil

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cfs_lightning.callbacks import OnlineReplay
from cfs_lightning.data import ReplayDataModule
from cfs_lightning.replay.contextual import contextual_replay
from cfs_lightning.replay.dialogue import self_dialogue
from cfs_lightning.rewrite.self_output import self_generated_targets
from cfs_lightning.rewrite.verifiers import Verifier
from cfs_lightning.sampling import Budget, InverseCDFSampler, SamplingConfig, sample_context_free
from cfs_lightning.shards import load_shards
from cfs_lightning.tasks import TaskSource
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.regularizers import KLToReference

from .conftest import CHAT_TEMPLATE
from .test_online_continual import Capture

PROMPT, RESPONSE = "Question: {question}\nAnswer:", " {answer}"


def _task(files) -> TaskSource:
    return TaskSource(path="json", data_files=files, split="train[:8]", prompt=PROMPT, response=RESPONSE,
                      max_length=256)


@pytest.fixture(scope="module")
def tokens(tiny_model_dir, tiny_task_files) -> dict[str, int]:
    """Ordinary token ids that no prompt, seed or chat template of these tests contains, so that
    any of them in a row was sampled: x (likely), y (likely first), w (sequence-biased), z (a bad word)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = _task(tiny_task_files)
    seen = {t for r in task.load(task.split) for t in task.prompt_ids(r, tok)}
    seen |= set(tok(CHAT_TEMPLATE.read_text() + " the sea a king")["input_ids"]) | set(tok.all_special_ids)
    free = [t for t in range(10, len(tok)) if t not in seen]
    return dict(zip("xywz", free[:4], strict=True))


@pytest.fixture(scope="module")
def opinionated_dir(tmp_path_factory, tiny_model_dir, tokens) -> str:
    """The tiny checkpoint with a generation_config.json that sets every field that would change
    the sampled distribution, as hub checkpoints do."""
    out = tmp_path_factory.mktemp("opinionated") / "model"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=5, repetition_penalty=1.5, no_repeat_ngram_size=1,
        suppress_tokens=[tokens["x"]], begin_suppress_tokens=[tokens["y"]], bad_words_ids=[[tokens["z"]]],
        min_new_tokens=8, forced_eos_token_id=tok.eos_token_id, sequence_bias=[[[tokens["w"]], -10.0]],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ).save_pretrained(out)
    return str(out)


def with_head(model, probs: dict[int, float]):
    """`model` with an output head whose next-token distribution is `probs` (the rest spread evenly)
    whatever the context: a distribution the samples can be checked against."""
    head = model.get_output_embeddings()
    rest = (1 - sum(probs.values())) / (head.out_features - len(probs))
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.fill_(math.log(rest))
        for token, p in probs.items():
            biased.bias[token] = math.log(p)
    model.set_output_embeddings(biased)
    return model


def head_probs(tokens, eos: int) -> dict[int, float]:
    return {tokens["x"]: 0.3, tokens["y"]: 0.15, tokens["w"]: 0.1, eos: 0.1}


def repeats_x(rows: list[list[int]], x: int) -> bool:
    """Some row holds x at least twice: not suppressed, and no n-gram ban."""
    return any(r.count(x) >= 2 for r in rows)


def test_the_checkpoint_generation_config_is_loaded_and_then_ignored(opinionated_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(opinionated_dir).eval()
    tok = AutoTokenizer.from_pretrained(opinionated_dir)
    assert model.generation_config.suppress_tokens == [tokens["x"]]  # the file is read
    cfg = SamplingConfig(max_new_tokens=12, batch_size=8, seed=1)
    records = [r for b in sample_context_free(model, tok, cfg, 16, None, store_topk=5) for r in b]
    assert model.generation_config.no_repeat_ngram_size == 1  # and left in place after sampling
    for rec in records:  # the recorded top-k is the raw softmax of a teacher-forced pass
        ids = torch.tensor([rec["input_ids"]])
        with torch.no_grad():
            top = model(input_ids=ids).logits[0, :-1].log_softmax(-1).topk(5)
        assert torch.equal(top.indices, torch.tensor(rec["topk_ids"]))
        torch.testing.assert_close(top.values, torch.tensor(rec["topk_logprobs"]), rtol=0, atol=1e-4)

    eos = tok.eos_token_id
    probs = head_probs(tokens, eos)
    with_head(model, probs)
    cfg = SamplingConfig(max_new_tokens=16, batch_size=128, seed=2)
    rows = [r["input_ids"][1:] for b in sample_context_free(model, tok, cfg, 512, None) for r in b]
    flat = [t for r in rows for t in r]

    def close(count: int, n: int, p: float) -> bool:  # within 4 standard errors
        return abs(count / n - p) <= 4 * math.sqrt(p * (1 - p) / n)

    # tokens drawn at every step (but the first, which the "first token" check below covers)
    later = [t for r in rows for t in r[1:]]
    assert close(later.count(tokens["x"]), len(later), probs[tokens["x"]] / (1 - 0))
    assert close(later.count(tokens["w"]), len(later), probs[tokens["w"]])  # no sequence bias
    assert close([r[0] for r in rows].count(tokens["y"]), len(rows), probs[tokens["y"]])  # no begin-suppress
    assert close(sum(len(r) == 1 for r in rows), len(rows), probs[eos])  # EOS at once: no min_new_tokens
    assert repeats_x(rows, tokens["x"]) and len(flat) > 2000


def test_every_sampler_ignores_the_checkpoint_generation_config(tmp_path, opinionated_dir, tokens, tiny_task_files):
    """Contextual replay, Self-Output, self-dialogue and on-policy samples of a model whose file
    suppresses x and bans repeated tokens: x is sampled, and repeated, as often as the head says."""
    tok = AutoTokenizer.from_pretrained(opinionated_dir)
    probs = head_probs(tokens, tok.eos_token_id)
    model = with_head(AutoModelForCausalLM.from_pretrained(opinionated_dir).eval(), probs)
    cfg = SamplingConfig(max_new_tokens=24, batch_size=8, seed=3)
    task = _task(tiny_task_files)
    x = tokens["x"]

    contextual_replay(model, tok, task, tmp_path / "cs", cfg, Budget(sequences=8))
    assert repeats_x([r.tolist() for r in load_shards(tmp_path / "cs")["input_ids"]], x)

    class AcceptAll(Verifier):
        def __call__(self, response: str, record: dict) -> bool:
            return True

    manifest = self_generated_targets(model, tok, task, AcceptAll(), tmp_path / "so", cfg, num_samples=2)
    assert manifest["stats"]["verified"] > 0
    assert repeats_x([r.tolist() for r in load_shards(tmp_path / "so")["input_ids"]], x)

    self_dialogue(model, tok, ["the sea", "a king"], tmp_path / "dl", cfg, 4, chat_template=str(CHAT_TEMPLATE))
    assert repeats_x([r.tolist() for r in load_shards(tmp_path / "dl")["input_ids"]], x)

    module = CausalLMFineTuner(opinionated_dir, reference="copy", regularizers=[KLToReference(on="onpolicy")],
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    with_head(module.hf_model, probs)
    online = OnlineReplay(every_n_steps=1, num_sequences=8, batch_size=8, sampling=cfg, sampler="trainable",
                          prompts="task", stream="onpolicy")
    capture = Capture("onpolicy")
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[online, capture]).fit(
        module, datamodule=ReplayDataModule(task, tokenizer=opinionated_dir, batch_size=2))
    rows = capture.replay[0]
    assert repeats_x([ids[m.bool()].tolist() for ids, m in zip(rows["input_ids"], rows["attention_mask"])], x)


def test_every_token_of_a_thin_tail_can_be_drawn(monkeypatch):
    """One token holds 0.9999 of the mass, 4,000 after it 2.5e-8 each. Rounded to float32, the
    cumulative distribution moves in steps of 6e-8 near 1, so most of those tokens would get an
    interval of width 0 (never drawn) and the others more than twice theirs. 4,000 draws spread
    evenly over the tail must reach (nearly) every one of its tokens."""
    tail, width = 4_000, 2.5e-8
    p = torch.full((1, tail + 1), width, dtype=torch.float64)
    p[0, 0] = 1 - tail * width
    logits = p.log().float().expand(tail, -1)
    grid = p[0, 0] + (torch.arange(tail, dtype=torch.float64) + 0.5) * width  # one draw per tail token
    monkeypatch.setattr(torch, "rand",  # the draw of `InverseCDFSampler`
                        lambda *size, device=None, dtype=torch.float32: grid.to(dtype).reshape(size))
    drawn = InverseCDFSampler()(None, logits).argmax(-1)
    assert drawn.min() >= 1 and drawn.unique().numel() >= 0.99 * tail


def test_a_lora_wrapper_keeps_the_stop_tokens_and_loses_the_other_settings(opinionated_dir, tokens):
    """The frozen reference of a LoRA fit (`adapters_disabled`) is sampled through its peft
    wrapper: the generation config's stop tokens still count, its other settings still do not."""
    from cfs_lightning.tokens import stop_token_ids
    from cfs_lightning.training.lora import LoRA, apply_lora

    tok = AutoTokenizer.from_pretrained(opinionated_dir)
    model = with_head(AutoModelForCausalLM.from_pretrained(opinionated_dir), head_probs(tokens, tok.eos_token_id))
    model.generation_config.eos_token_id = [tok.eos_token_id, tokens["w"]]
    wrapped = apply_lora(model, LoRA(r=2)).eval()
    assert stop_token_ids(tok, wrapped) == [tok.eos_token_id, tokens["w"]]
    cfg = SamplingConfig(max_new_tokens=16, batch_size=32, seed=4)
    rows = [r["input_ids"][1:] for b in sample_context_free(wrapped, tok, cfg, 32, None) for r in b]
    assert repeats_x(rows, tokens["x"]) and any(r[-1] == tokens["w"] for r in rows)
    assert wrapped.get_base_model().generation_config.suppress_tokens == [tokens["x"]]  # put back
