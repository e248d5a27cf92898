"""Self-dialogue replay: dialogues through the chat template, user turns masked or trained on."""

from __future__ import annotations

import pytest

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.data import Collator
from cfs_lightning.sampling import GenerationError, SamplingConfig
from cfs_lightning.shards import load_shards, read_manifest
from cfs_lightning.replay.dialogue import encode_dialogue, self_dialogue, use_chat_template

from .conftest import CHAT_TEMPLATE

CONVERSATION = [{"role": "user", "content": "Speak of the sea."},
                {"role": "assistant", "content": "It is wide and grey."},
                {"role": "user", "content": "And the sky?"},
                {"role": "assistant", "content": "Wider still."}]


def _targets(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_encoded_dialogues_train_on_assistant_turns_and_optionally_user_turns(tiny_tokenizer):
    use_chat_template(tiny_tokenizer, str(CHAT_TEMPLATE))
    ids, labels = encode_dialogue(tiny_tokenizer, CONVERSATION)
    full = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tiny_tokenizer.decode(ids) == full and len(ids) == len(labels)
    eos = tiny_tokenizer.eos_token
    assert _targets(tiny_tokenizer, ids, labels) == f" It is wide and grey.{eos}\n Wider still.{eos}\n"
    ids_u, labels_u = encode_dialogue(tiny_tokenizer, CONVERSATION, train_on_user_turns=True)
    trained = _targets(tiny_tokenizer, ids_u, labels_u)
    assert ids_u == ids and "Speak of the sea." in trained and "And the sky?" in trained
    assert "Wider still." in trained and "Assistant:" not in trained  # headers are never targets


def test_self_dialogue_is_reproducible_and_masks_user_turns(tmp_path, tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=10, batch_size=4, seed=2)
    kwargs = dict(turns=2, max_length=200, seed_template="Tell me of {seed}.", chat_template=str(CHAT_TEMPLATE))
    manifest = self_dialogue(tiny_model, tiny_tokenizer, ["ships", "kings", "rain"], tmp_path / "a", cfg, 6, **kwargs)
    rows = [(r["input_ids"].tolist(), r["labels"].tolist()) for r in load_shards(tmp_path / "a")]
    stats = manifest["stats"]  # a dialogue with an empty turn is dropped, and counted
    assert manifest["source"] == "self_dialogue" and manifest["num_sequences"] == len(rows) >= 4
    assert stats["dialogues"] == len(rows) == 6 - stats["empty_turns"] and manifest["train_on_user_turns"] is False
    assert manifest["chat_template"] == CHAT_TEMPLATE.read_text()
    for ids, labels in rows:
        text = tiny_tokenizer.decode(ids)
        assert text.startswith(tiny_tokenizer.bos_token + "User: Tell me of ") and text.count("Assistant:") == 2
        assert text.count("User:") == 2  # seed turn + one model-written user turn
        trained = _targets(tiny_tokenizer, ids, labels)
        assert "Tell me of" not in trained and "User:" not in trained and trained.count(tiny_tokenizer.eos_token) == 2
    self_dialogue(tiny_model, tiny_tokenizer, ["ships", "kings", "rain"], tmp_path / "b", cfg, 6, **kwargs)
    assert [r["input_ids"].tolist() for r in load_shards(tmp_path / "b")] == [r[0] for r in rows]
    self_dialogue(tiny_model, tiny_tokenizer, ["ships", "kings", "rain"], tmp_path / "u", cfg, 6,
                  train_on_user_turns=True, **kwargs)
    user_rows = [(r["input_ids"].tolist(), r["labels"].tolist()) for r in load_shards(tmp_path / "u")]
    assert [r[0] for r in user_rows] == [r[0] for r in rows]
    assert all("Tell me of" in _targets(tiny_tokenizer, *r) for r in user_rows)
    batch = Collator(tiny_tokenizer.pad_token_id)([dict(input_ids=i, labels=lab) for i, lab in rows])
    assert (batch["labels"] == IGNORE_INDEX).sum() > (batch["attention_mask"] == 0).sum()  # replay NLL sees the mask


def test_a_tokenizer_without_chat_template_is_refused(tmp_path, tiny_model, tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    with pytest.raises(GenerationError, match="has no chat template.*give chat_template"):
        self_dialogue(tiny_model, tiny_tokenizer, ["x"], tmp_path / "d", SamplingConfig(max_new_tokens=4), 2)
    assert not (tmp_path / "d").exists()


def test_dialogues_that_outgrow_max_length_end_early_or_are_dropped(tmp_path, tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=24, batch_size=4, stop_at_eos=False)
    manifest = self_dialogue(tiny_model, tiny_tokenizer, ["the sea"], tmp_path / "d", cfg, 4, turns=3,
                             max_length=60, chat_template=str(CHAT_TEMPLATE))
    stats = manifest["stats"]
    assert stats["ended_early"] == 4 and stats["unfinished_turns"] > 0
    for r in load_shards(tmp_path / "d"):
        assert len(r["input_ids"]) <= 60 and tiny_tokenizer.decode(r["input_ids"]).count("Assistant:") < 3
    with pytest.raises(GenerationError, match="every dialogue was dropped"):
        self_dialogue(tiny_model, tiny_tokenizer, ["word " * 80], tmp_path / "x", cfg, 2, max_length=60,
                      chat_template=str(CHAT_TEMPLATE))
    assert not (tmp_path / "x").exists()
    assert read_manifest(tmp_path / "d")["stats"] == stats
