"""Replay sources besides context-free sampling: real text (corpus) and contextual synthetic."""

from __future__ import annotations

import pytest

from cfs_lightning.tasks import TaskSource
from cfs_lightning.sampling import Budget, GenerationError, SamplingConfig
from cfs_lightning.shards import check_manifest, load_shards, read_manifest
from cfs_lightning.replay.contextual import contextual_replay
from cfs_lightning.replay.corpus import CorpusSource, corpus_replay

from .conftest import SHAKESPEARE, write_jsonl


def _rows(replay_dir) -> list[list[int]]:
    return [r["input_ids"].tolist() for r in load_shards(replay_dir)]


def test_corpus_is_packed_into_start_token_sequences(tmp_path, tiny_tokenizer, tiny_model):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"body": "To be, or not to be."}, {"body": "  "},
                                                 {"body": "All the world's a stage, and all the men."}] * 5)
    corpus = CorpusSource(path="json", data_files=docs, text_field="body")
    manifest = corpus_replay(corpus, tiny_tokenizer, tmp_path / "r", Budget(tokens=40), max_length=9)
    rows = _rows(tmp_path / "r")
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert all(r[0] == bos and len(r) <= 9 for r in rows) and all(len(r) == 9 for r in rows[:-1])
    assert sum(len(r) - 1 for r in rows) == 40 == manifest["num_generated_tokens"]  # exact budget
    text = [t for r in rows for t in r[1:]]
    first = tiny_tokenizer.encode("To be, or not to be.", add_special_tokens=False) + [eos]
    assert text[: len(first)] == first  # documents in order, each followed by EOS
    assert manifest["source"] == "corpus" and manifest["model_fingerprint"] is None
    assert manifest["corpus_stats"]["empty_documents"] >= 1
    check_manifest(manifest, tiny_tokenizer, tiny_model)  # no model recorded: any model may replay it


def test_a_corpus_too_small_for_the_budget_writes_nothing(tmp_path, tiny_tokenizer):
    corpus = CorpusSource(data_files=str(SHAKESPEARE / "heldout.txt"), split="train[:3]")
    with pytest.raises(GenerationError, match="fewer than the budget asks"):
        corpus_replay(corpus, tiny_tokenizer, tmp_path / "r", Budget(sequences=10_000), max_length=64)
    assert not (tmp_path / "r").exists()
    with pytest.raises(GenerationError, match="no column 'body'"):
        corpus_replay(CorpusSource(data_files=str(SHAKESPEARE / "heldout.txt"), text_field="body"),
                      tiny_tokenizer, tmp_path / "r", Budget(sequences=1))


def _task(tiny_task_files, **kwargs) -> TaskSource:
    return TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", **kwargs)


def test_contextual_replay_continues_task_prompts_reproducibly(tmp_path, tiny_model, tiny_tokenizer,
                                                               tiny_task_files):
    task = _task(tiny_task_files, max_length=256)
    cfg = SamplingConfig(max_new_tokens=12, batch_size=8, seed=5)
    manifest = contextual_replay(tiny_model, tiny_tokenizer, task, tmp_path / "a", cfg, Budget(sequences=20))
    again = contextual_replay(tiny_model, tiny_tokenizer, task, tmp_path / "b", cfg, Budget(sequences=20))
    other = contextual_replay(tiny_model, tiny_tokenizer, task, tmp_path / "c",
                              SamplingConfig(max_new_tokens=12, batch_size=8, seed=6), Budget(sequences=20))
    rows = _rows(tmp_path / "a")
    assert rows == _rows(tmp_path / "b") and rows != _rows(tmp_path / "c")
    prompts = {tuple(task.prompt_ids(r, tiny_tokenizer)) for r in task.load("train")}
    stats = manifest["contextual_stats"]
    assert len(rows) + stats["empty_continuations"] >= 20 and len(rows) == manifest["num_sequences"]
    for row in rows:  # every sequence is a task prompt followed by at least one new token
        prefix = next(p for p in prompts if tuple(row[: len(p)]) == p)
        assert 0 < len(row) - len(prefix) <= 12
    assert manifest["source"] == "contextual" and manifest["model_fingerprint"]
    assert other["sampling"]["seed"] == 6


def test_contextual_replay_counts_prompts_too_long_and_refuses_when_none_fit(tmp_path, tiny_model,
                                                                            tiny_tokenizer, tiny_task_files):
    task = _task(tiny_task_files, max_length=120)
    lengths = [len(task.prompt_ids(r, tiny_tokenizer)) for r in task.load("train")]
    manifest = contextual_replay(tiny_model, tiny_tokenizer, task, tmp_path / "r",
                                 SamplingConfig(max_new_tokens=4, batch_size=8), Budget(tokens=30))
    assert manifest["contextual_stats"]["prompts_too_long"] == sum(n >= 120 for n in lengths) > 0
    assert manifest["contextual_stats"]["continuation_tokens"] == 30
    assert all(len(r) <= 120 for r in _rows(tmp_path / "r"))
    with pytest.raises(GenerationError, match="raise task.max_length"):
        contextual_replay(tiny_model, tiny_tokenizer, _task(tiny_task_files, max_length=5), tmp_path / "x",
                          SamplingConfig(), Budget(sequences=2))
    assert not (tmp_path / "x").exists()
