"""The compatibility matrix: every step of cfs_lightning on each model family of `tests/families.py`
(a tiny random model of the architecture beside the checkpoint's real or faithfully built
tokenizer and its generation config).

Per family: `cfs generate` starts where the checkpoint's documents start and ends at every stop
token the checkpoint declares (not only the tokenizer's EOS); it never samples the padded rows
of the embedding; `cfs fit` runs every regularizer with RetainedEval and export, and the
exported model reloads with the same logits and the same lm-eval score; LoRA's default targets
fit; chat models train on exactly their assistant turns and `cfs dialogue` runs on their
template. Gemma 2's soft-capped logits reach the KL reference.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from cfs_lightning.training import heads as heads_module
from cfs_lightning.cli import main
from cfs_lightning.experiments.runner import run_cli
from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.tasks import TaskSource
from cfs_lightning.chat import ChatTemplateError, encode_chat
from cfs_lightning.evaluation import evaluate_lm, load_task_yaml
from cfs_lightning.sampling import Budget, SamplingConfig
from cfs_lightning.replay.context_free import generate_replay
from cfs_lightning.shards import load_shards, read_manifest
from cfs_lightning.training.reference import FrozenReference, ReferenceError
from cfs_lightning.tokens import TokenError

from .conftest import GSM8K, REPO, make_eos_prone
from .families import BY_NAME, FAMILIES, build, stop_ids



def _params(fast: set[str], chat_only: bool = False) -> list:
    """One param per family; those not in `fast` are marked slow (the Gemma vocabulary of 262k
    makes every step minutes on 2 CPU cores; fits take tens of seconds each)."""
    return [pytest.param(f, id=f.name, marks=() if f.name in fast else pytest.mark.slow)
            for f in FAMILIES if f.chat or not chat_only]


CHEAP = {"llama", "qwen3", "olmo", "gpt2", "gpt_neox", "phi3"}
FAMILY = _params(CHEAP)
FIT = _params(set())
CHAT = _params(CHEAP, chat_only=True)
HELDOUT = str(REPO / "configs" / "tasks" / "shakespeare_heldout.yaml")

ASSISTANT_TURN = {  # the assistant turn as each template renders it last: what training targets
    "llama": "{}<|eot_id|>",
    "qwen3": "<think>\n\n</think>\n\n{}<|im_end|>\n",
    "gemma3": "{}<end_of_turn>\n",
    "gemma2": "{}<end_of_turn>\n",
    "phi3": "{}<|end|>\n<|endoftext|>",
}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family name -> its saved tiny model and tokenizer (built once per session)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build(BY_NAME[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _stops(family, tok) -> set[int]:
    return set(stop_ids(family, tok)) | {tok.eos_token_id}


@pytest.mark.parametrize("family", FAMILY)
def test_generate_starts_where_documents_start_and_ends_at_every_declared_stop(family, family_dir, tmp_path):
    model_dir = family_dir(family.name)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = ["generate", f"--base.model={model_dir}", "--budget.sequences=6", "--sampling.max_new_tokens=8",
            "--sampling.batch_size=6", "--store_topk=4", "--base.device=cpu"]
    if family.start_token:  # no BOS: refused, and the advice names the document separator
        with pytest.raises(TokenError, match=re.escape(f"to its document separator '{family.start_token}'")):
            main([*args, f"--output.dir={tmp_path / 'refused'}"])
        assert not (tmp_path / "refused").exists()
        args.append(f"--sampling.start_token={family.start_token}")
    main([*args, f"--output.dir={tmp_path / 'r'}"])
    manifest = read_manifest(tmp_path / "r")
    stops = _stops(family, tok)
    assert set(manifest["stop_token_ids"]) == stops and manifest["start_token"] == family.start
    start = tok.convert_tokens_to_ids(family.start)
    rows = list(load_shards(tmp_path / "r"))
    assert len(rows) == 6
    for row in rows:
        ids = row["input_ids"].tolist()
        assert ids[0] == start and not stops & set(ids[1:-1]) and max(ids) < len(tok)
        assert row["topk_ids"].shape == (len(ids) - 1, 4)


@pytest.mark.parametrize("family", FAMILY)
def test_sampling_stops_at_a_declared_stop_and_never_samples_padded_rows(family, family_dir, tmp_path):
    model, tok = _load(family_dir(family.name))
    stop = stop_ids(family, tok)[-1]  # a stop the tokenizer's EOS is not, where the family has one
    make_eos_prone(model, stop, bias=60.0)
    cfg = SamplingConfig(max_new_tokens=12, batch_size=4, seed=0, start_token=family.start_token)
    generate_replay(model, tok, tmp_path / "stop", cfg, Budget(sequences=4))
    assert [r["input_ids"].tolist() for r in load_shards(tmp_path / "stop")] == \
        [[tok.convert_tokens_to_ids(family.start), stop]] * 4
    if family.padded_vocab:  # the embedding's padding rows exist in the model, not the tokenizer
        make_eos_prone(model, len(tok) + 1, bias=60.0)
        cfg = SamplingConfig(max_new_tokens=6, batch_size=4, seed=0, start_token=family.start_token,
                             stop_at_eos=False)
        generate_replay(model, tok, tmp_path / "pad", cfg, Budget(sequences=4))
        rows = [r["input_ids"].tolist() for r in load_shards(tmp_path / "pad")]
        assert all(len(r) == 7 and max(r) < len(tok) for r in rows)


def _fit_config(family, model_dir, replay_dir, tmp_path) -> dict:
    chat = family.chat
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                    "enable_checkpointing": False, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "cfs_lightning.callbacks.RetainedEval",
                                   "init_args": {"tasks": [HELDOUT], "limit": 3, "batch_size": 4}}]},
        "model": {"class_path": "cfs_lightning.training.CausalLMFineTuner", "init_args": {
            "pretrained": str(model_dir), "reference": "copy",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            "regularizers": [
                {"class_path": "cfs_lightning.training.regularizers.NLLReplay"},
                {"class_path": "cfs_lightning.training.regularizers.KLToReference", "init_args": {"chunk_size": 8}},
                {"class_path": "cfs_lightning.training.regularizers.KLFromCachedTopK"},
                {"class_path": "cfs_lightning.training.regularizers.L2ToInit", "init_args": {"weight": 0.01}},
                {"class_path": "cfs_lightning.training.regularizers.EMA", "init_args": {"decay": 0.5, "final": "ema"}},
            ]}},
        "data": {"class_path": "cfs_lightning.data.ReplayDataModule", "init_args": {
            "task": {"path": "json", "data_files": {"train": str(GSM8K / "train.jsonl"),
                                                     "test": str(GSM8K / "test.jsonl")},
                     "split": "train[:12]", "val_split": "test[:4]", "max_length": 112,
                     "prompt": "{question}" if chat else "Question: {question}\nAnswer:",
                     "response": "{answer}" if chat else " {answer}", "chat_template": chat},
            "batch_size": 4, "replay_ratio": 0.5, "replay": {"dir": str(replay_dir), "val_size": 2}}},
        "export": {"dirpath": str(tmp_path / "hf")},
    }


@pytest.mark.parametrize("family", FIT)
def test_fit_with_every_regularizer_evaluates_and_exports_a_model_lm_eval_scores_the_same(
        family, family_dir, tmp_path, monkeypatch):
    model_dir = family_dir(family.name)
    model, tok = _load(model_dir)
    cfg = SamplingConfig(max_new_tokens=16, batch_size=8, seed=0, start_token=family.start_token)
    generate_replay(model, tok, tmp_path / "replay", cfg, Budget(sequences=8), store_topk=4)
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(_fit_config(family, model_dir, tmp_path / "replay", tmp_path)))
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(config)])
    metrics = cli.trainer.callback_metrics
    terms = {k.removeprefix("train/reg/") for k in metrics if k.startswith("train/reg/")}
    assert {"nll_replay", "kl_to_reference", "kl_from_cached_top_k", "l2_to_init"} <= terms
    assert all(torch.isfinite(metrics[f"train/reg/{t}"]) for t in terms)
    assert cli.trainer.global_step == cli.trainer.num_training_batches > 0
    retained = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RetainedEval")
    final = retained.history[-1]["eval/shakespeare_heldout/bits_per_byte"]
    assert final != retained.history[0]["eval/shakespeare_heldout/bits_per_byte"]  # the weights moved

    exported, exported_tok = _load(tmp_path / "hf")
    assert type(exported).__name__ == type(model).__name__
    ids = torch.tensor([tok.encode("To be, or not to be", add_special_tokens=False)[:8]])
    live = cli.model.hf_model.eval()
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, live(ids).logits, atol=1e-5)
    # lm-eval on the reloaded export scores it as RetainedEval scored the model in training
    scores, _, _ = evaluate_lm(exported, exported_tok, [load_task_yaml(HELDOUT)], batch_size=4, limit=3)
    assert scores["shakespeare_heldout/bits_per_byte"] == pytest.approx(final, rel=1e-5)


@pytest.mark.parametrize("family", FIT)
def test_lora_default_targets_fit_with_kl_to_the_adapters_disabled_model(family, family_dir, tmp_path,
                                                                         monkeypatch):
    model_dir = family_dir(family.name)
    model, tok = _load(model_dir)
    cfg = SamplingConfig(max_new_tokens=16, batch_size=8, seed=0, start_token=family.start_token)
    generate_replay(model, tok, tmp_path / "replay", cfg, Budget(sequences=8))
    config = _fit_config(family, model_dir, tmp_path / "replay", tmp_path)
    config["trainer"].update(max_steps=2, callbacks=[])
    config["model"]["init_args"].update(
        reference="adapters_disabled", lora={"r": 4, "alpha": 8},
        regularizers=[{"class_path": "cfs_lightning.training.regularizers.KLToReference"}])
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(tmp_path / "fit.yaml")])
    assert torch.isfinite(cli.trainer.callback_metrics["train/reg/kl_to_reference"])
    adapted = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    head = model.get_output_embeddings()
    linear = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    assert set(adapted) == linear  # every linear layer but the head (GPT-2's are Conv1D)
    merged, _ = _load(tmp_path / "hf")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", CHAT)
def test_chat_task_trains_on_the_assistant_turn_as_the_template_renders_it(family, family_dir):
    tok = AutoTokenizer.from_pretrained(family_dir(family.name))
    task = TaskSource(prompt="{question}", response="{answer}", chat_template=True)
    record = {"question": "What is two and two?", "answer": "Four."}
    row = task.example(record, tok)
    ids, labels = row["input_ids"], row["labels"]
    messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == \
        ASSISTANT_TURN[family.name].format("Four.")
    assert ids.count(tok.bos_token_id) <= 1  # the template's BOS, not a second one
    # inside a conversation a turn ends at its end-of-turn, before the next header
    two = [*messages, {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Six."}]
    ids, labels = encode_chat(tok, two)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    first_end = ASSISTANT_TURN[family.name].split("{}")[1].removesuffix("<|endoftext|>")
    assert trained.startswith("Four." + first_end)
    assert trained.endswith(ASSISTANT_TURN[family.name].format("Six."))


@pytest.mark.parametrize("family", CHAT)
def test_dialogue_command_runs_on_the_checkpoint_chat_template(family, family_dir, tmp_path):
    model_dir = family_dir(family.name)
    tok = AutoTokenizer.from_pretrained(model_dir)
    main(["dialogue", f"--base.model={model_dir}", f"--output.dir={tmp_path / 'd'}", "--num_dialogues=2",
          "--seeds=[rain]", "--seed_template=Tell me of {seed}.", "--turns=1", "--sampling.max_new_tokens=6", "--base.device=cpu"])
    rows = list(load_shards(tmp_path / "d"))
    assert len(rows) == 2
    for row in rows:
        ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
        text = tok.decode(ids)
        trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        assert "Tell me of rain." in text and "Tell me of" not in trained and trained


R1_TEMPLATE = (  # DeepSeek-R1's way: the reasoning before </think> is dropped from assistant turns
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% else %}"
    "{% set c = m['content'] %}{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<｜Assistant｜>{{ c }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def test_a_template_that_drops_part_of_the_trained_turn_is_refused(family_dir):
    tok = AutoTokenizer.from_pretrained(family_dir("llama"))
    tok.chat_template = R1_TEMPLATE
    task = TaskSource(prompt="{q}", response="{cot}</think>{a}", chat_template=True)
    with pytest.raises(ChatTemplateError, match="chat_template=false"):
        task.example({"q": "Two and two?", "cot": "Count them.", "a": "Four."}, tok)


def test_gemma2_soft_capped_logits_reach_the_kl_reference(family_dir, monkeypatch):
    model, tok = _load(family_dir("gemma2"))
    with torch.no_grad():  # logits of a few hundred before the cap, as a trained model's are
        model.model.norm.weight.fill_(300.0)
    ids = torch.tensor([tok.encode("Now is the winter", add_special_tokens=True)])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        ref = FrozenReference(model, "copy")
        ref_logits = ref.logits(ref.hidden_states(ids, mask))
    assert logits.abs().max() > 25 and logits.abs().max() <= 30.0  # capped at final_logit_softcapping
    assert torch.allclose(ref_logits, logits, atol=1e-4)
    monkeypatch.setattr(heads_module, "postprocess_logits", lambda config, logits: logits)
    with pytest.raises(ReferenceError, match="final_logit_softcapping"):
        FrozenReference(model, "copy")


def test_packed_corpus_separates_documents_with_the_qwen3_document_separator(family_dir, tmp_path):
    from cfs_lightning.replay.corpus import CorpusSource, corpus_replay

    tok = AutoTokenizer.from_pretrained(family_dir("qwen3"))
    text = tmp_path / "docs.txt"
    text.write_text("First document here.\n\nSecond one.\n\nThird and last.\n")
    corpus = CorpusSource(path="text", data_files=str(text), load_kwargs={"sample_by": "paragraph"})
    manifest = corpus_replay(corpus, tok, tmp_path / "c", Budget(sequences=1), max_length=32,
                             start_token="<|endoftext|>")
    (row,) = load_shards(tmp_path / "c")
    decoded = tok.decode(row["input_ids"].tolist())
    assert manifest["document_separator"] == "<|endoftext|>"
    assert decoded.startswith("<|endoftext|>First document here.<|endoftext|>Second one.")
    assert "<|im_end|>" not in decoded


def _readme_yaml_blocks() -> list[dict]:
    text = (REPO / "docs/models.md").read_text()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_the_readme_per_family_snippets_are_valid_configs(tmp_path, capsys):
    blocks = _readme_yaml_blocks()
    generate = [b for b in blocks if "output" in b]
    assert len(generate) >= 4
    for i, block in enumerate(generate):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(block))
        with pytest.raises(SystemExit) as done:  # --print_config validates every key, then exits
            main(["generate", "--config", str(tmp_path / f"{i}.yaml"), "--print_config"])
        assert done.value.code in (0, None), capsys.readouterr().err
    assert "start_token: <|endoftext|>" in capsys.readouterr().out
    task = next(b for b in blocks if "data" in b)["data"]["init_args"]["task"]
    assert TaskSource(**task).chat_template is True
