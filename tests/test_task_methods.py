"""Task-side methods: Self-Output / Rephrase with verifiers, and selective token masking (STM)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.tasks import TaskSource
from cfs_lightning.sampling import GenerationError, SamplingConfig
from cfs_lightning.shards import load_shards, read_manifest
from cfs_lightning.rewrite.self_output import _lowest_perplexity, self_generated_targets
from cfs_lightning.rewrite.token_mask import mask_tokens, token_mask
from cfs_lightning.rewrite.verifiers import GSM8KAnswer, RegexMatch, Verifier, VerifierError

from .conftest import make_eos_prone, write_jsonl


def _task(files, **kwargs) -> TaskSource:
    return TaskSource(path="json", data_files=files, split="train[:6]", prompt="Question: {question}\nAnswer:",
                      response=" {answer}", **kwargs)


def _rows(path) -> list[tuple[list[int], list[int]]]:
    return [(r["input_ids"].tolist(), r["labels"].tolist()) for r in load_shards(path)]


# -- verifiers ---------------------------------------------------------------------------------------

def test_gsm8k_verifier_compares_the_final_number():
    v, record = GSM8KAnswer(), {"answer": "3 + 4 = 7 apples\n#### 1,000"}
    assert v("so the total is\n#### 1000.0", record)
    assert v("#### 12\nno, wait\n#### $1000", record)  # the last answer counts
    assert not v("#### 1001", record) and not v("The answer is 1000", record)
    with pytest.raises(VerifierError, match="has no `#### <number>`"):
        v("#### 3", {"answer": "three"})
    with pytest.raises(VerifierError, match="no field 'answer'"):
        v("#### 3", {"solution": "#### 3"})


def test_regex_verifier_uses_the_first_group_of_the_last_match():
    v = RegexMatch(r"answer is (\w+)", reference_field="label", ignore_case=True)
    assert v("I think the Answer is Paris", {"label": "The answer is paris"})
    assert not v("the answer is Rome", {"label": "the answer is Paris"})
    assert RegexMatch(r"\d+", "y")("got 41 then 42", {"y": "42"})
    with pytest.raises(VerifierError, match="does not match the reference"):
        v("answer is x", {"label": "unknown"})


# -- Self-Output / Rephrase --------------------------------------------------------------------------

class AcceptFirstRecords(Verifier):
    """Accepts any response to the first `n` records of the split; records every call."""

    def __init__(self, questions: list[str]) -> None:
        self.questions, self.calls = questions, []

    def __call__(self, response: str, record: dict) -> bool:
        self.calls.append((record["question"], response))
        return record["question"] in self.questions


@pytest.fixture
def eos_model(tiny_model, tiny_tokenizer):
    return make_eos_prone(tiny_model, tiny_tokenizer.eos_token_id)


def test_self_output_keeps_verified_samples_and_falls_back_to_the_reference(tmp_path, eos_model, tiny_tokenizer,
                                                                          tiny_task_files):
    task = _task(tiny_task_files, max_length=256)
    records = list(task.load(task.split))
    verifier = AcceptFirstRecords([r["question"] for r in records[:3]])
    # A seed under which at least two of the three accepted questions get a usable sample, so
    # both the verified and the fallback path are exercised.
    cfg = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=16, batch_size=8, seed=5)
    manifest = self_generated_targets(eos_model, tiny_tokenizer, task, verifier, tmp_path / "a", cfg, num_samples=4)
    stats = manifest["stats"]
    assert manifest["source"] == "self_output" and manifest["num_samples"] == 4
    assert manifest["verifier"]["class_path"].endswith("AcceptFirstRecords")
    assert stats["records"] == 6 and stats["verified"] + stats["fallback"] == 6
    assert stats["samples"] == 24 and stats["empty_samples"] > 0  # immediate EOS: counted, not offered
    usable = stats["samples"] - stats["empty_samples"] - stats["unfinished_samples"] - stats["too_long_samples"]
    assert len(verifier.calls) == usable
    accepted = {q: {t for q2, t in verifier.calls if q2 == q} for q in verifier.questions}
    assert stats["verified"] == sum(bool(texts) for texts in accepted.values()) >= 2
    rows = _rows(tmp_path / "a")
    for record, (ids, labels) in zip(records, rows, strict=True):
        reference = task.example(record, tiny_tokenizer)
        prompt = task.prompt_ids(record, tiny_tokenizer)
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        if accepted.get(record["question"]):
            response = ids[len(prompt):]
            assert response[-1] == tiny_tokenizer.eos_token_id and labels[len(prompt):] == response
            assert tiny_tokenizer.decode(response, skip_special_tokens=True) in accepted[record["question"]]
        else:  # no correct sample: the reference response
            assert (ids, labels) == (reference["input_ids"], reference["labels"])
    again = self_generated_targets(eos_model, tiny_tokenizer, task, AcceptFirstRecords(verifier.questions),
                                   tmp_path / "b", cfg, num_samples=4)
    assert _rows(tmp_path / "b") == rows and again["stats"] == stats
    self_generated_targets(eos_model, tiny_tokenizer, task, AcceptFirstRecords(verifier.questions),
                           tmp_path / "c", SamplingConfig(temperature=0.7, max_new_tokens=16, batch_size=8, seed=4),
                           num_samples=4)
    assert _rows(tmp_path / "c") != rows


def test_the_lowest_perplexity_correct_sample_is_chosen(tiny_model, tiny_tokenizer):
    prompts = [[0, 5, 6, 7], [0, 9]]
    candidates = {0: [[10, 11, 1], [40, 41, 42, 1], [12, 1]], 1: [[100, 1]]}
    chosen = _lowest_perplexity(tiny_model, tiny_tokenizer, prompts, candidates, batch_size=2)

    def ppl(prompt, response):  # float64 reference, one sequence at a time
        ids = torch.tensor([prompt + response])
        logits = tiny_model.double()(input_ids=ids).logits[0, :-1]
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")[len(prompt) - 1:]
        return math.exp(nll.mean().item())

    with torch.no_grad():
        expected = min(candidates[0], key=lambda r: ppl(prompts[0], r))
    tiny_model.float()
    assert chosen == {0: expected, 1: [100, 1]}


def test_a_verifier_that_raises_stops_with_the_record_named(tmp_path, eos_model, tiny_tokenizer, tiny_task_files):
    class Broken(Verifier):
        def __call__(self, response, record):
            raise KeyError("score")

    with pytest.raises(GenerationError, match=r"verifier Broken raised KeyError on task record \d"):
        self_generated_targets(eos_model, tiny_tokenizer, _task(tiny_task_files), Broken(), tmp_path / "o",
                               SamplingConfig(max_new_tokens=16, batch_size=8), num_samples=2)
    assert not (tmp_path / "o").exists()


def test_prompts_longer_than_max_length_are_counted_and_keep_their_reference(tmp_path, eos_model, tiny_tokenizer):
    long_question = "How many ships sail from the harbour when the king commands it? " * 4
    records = [{"question": "Two and two?", "answer": "#### 4"}, {"question": long_question, "answer": "#### 5"},
               {"question": "Three and one?", "answer": "#### 4"}]
    task = _task({"train": write_jsonl(tmp_path / "t.jsonl", records)}, max_length=40)
    assert [len(task.prompt_ids(r, tiny_tokenizer)) >= 40 for r in records] == [False, True, False]
    manifest = self_generated_targets(eos_model, tiny_tokenizer, task, GSM8KAnswer(), tmp_path / "o",
                                      SamplingConfig(max_new_tokens=8, batch_size=8), num_samples=2)
    stats = manifest["stats"]
    assert stats["prompts_too_long"] == 1 and stats["samples"] == 4 and stats["fallback"] == 3
    assert stats["dropped"] == 1  # cut to 40 tokens it keeps no response token, as in task tokenization
    rows = _rows(tmp_path / "o")
    assert rows == [tuple(task.example(r, tiny_tokenizer)[k] for k in ("input_ids", "labels")) for r in records[::2]]


def test_rephrase_prompts_the_model_with_the_reference(tmp_path, eos_model, tiny_tokenizer, tiny_task_files):
    task = _task(tiny_task_files, max_length=512)
    seen = []

    class Spy(Verifier):
        def __call__(self, response, record):
            seen.append(record["question"])
            return True

    template = "Say it again: {prompt}{response}\nAgain:"
    manifest = self_generated_targets(eos_model, tiny_tokenizer, task, Spy(), tmp_path / "r",
                                      SamplingConfig(max_new_tokens=16, batch_size=8), num_samples=2,
                                      method="rephrase", rephrase_template=template)
    assert manifest["source"] == "rephrase" and manifest["rephrase_template"] == template
    assert manifest["stats"]["verified"] == len(set(seen)) > 0
    # the rewrite is trained as the response to the task's own prompt, not to the rephrase prompt
    record = next(iter(task.load(task.split)))
    ids, _ = _rows(tmp_path / "r")[0]
    assert ids[: len(task.prompt_ids(record, tiny_tokenizer))] == task.prompt_ids(record, tiny_tokenizer)


# -- token masking (STM) -----------------------------------------------------------------------------

def test_mask_modes_mask_the_same_count_at_their_positions():
    I = IGNORE_INDEX
    labels = [I, I, 7, 8, 9, 10, 11]  # prompt = positions 0-1, response = 2-6
    ppl = [9.0, 30.0, 1.5, 8.0, 2.0, 1.1]  # ppl[t-1] scores token t; 9.0 is a prompt token's
    high, n = mask_tokens(labels, ppl, 2.5, "high", random.Random(0))
    assert n == 2 and high == [I, I, I, 8, I, 10, 11]  # the first response token is scored too
    low, _ = mask_tokens(labels, ppl, 2.5, "low", random.Random(0))
    assert low == [I, I, 7, I, 9, 10, I]
    draws = {tuple(mask_tokens(labels, ppl, 2.5, "random", random.Random(s))[0]) for s in range(20)}
    assert len(draws) > 1
    for out in [high, low, *draws]:
        assert list(out[:2]) == labels[:2] and sum(x == I for x in out[2:]) == 2


def test_token_mask_scores_every_response_token_and_caches_with_provenance(tmp_path, tiny_model, tiny_tokenizer,
                                                                           tiny_task_files):
    task = _task(tiny_task_files, max_length=128)
    data = task.tokenize(task.load(task.split), tiny_tokenizer)
    with torch.no_grad():  # independent per-token perplexities, one sequence at a time
        ppl = []
        for ids in data["input_ids"]:
            t = torch.tensor([ids])
            ppl.append(F.cross_entropy(tiny_model(input_ids=t).logits[0, :-1], t[0, 1:], reduction="none").exp())
    tau = float(torch.cat(ppl).median())
    counts = {}
    for mode in ("high", "random", "low"):
        manifest = token_mask(tiny_model, tiny_tokenizer, task, tmp_path / mode, tau=tau, mode=mode, seed=1)
        rows = _rows(tmp_path / mode)
        assert manifest["source"] == "token_mask" and manifest["mode"] == mode and manifest["tau"] == tau
        assert manifest["model_fingerprint"] and manifest["tokenizer_fingerprint"]
        counts[mode] = [sum(a != b for a, b in zip(labels, ref)) for (_, labels), ref in zip(rows, data["labels"])]
        stats = manifest["stats"]
        assert stats["masked_tokens"] == sum(counts[mode])
        assert stats["masked_fraction"] == pytest.approx(stats["masked_tokens"] / stats["response_tokens"])
    assert counts["high"] == counts["random"] == counts["low"] and sum(counts["high"]) > 0
    first_masked = 0
    for (ids, labels), ref, p in zip(_rows(tmp_path / "high"), data["labels"], ppl):
        for t in range(1, len(ids)):
            if ref[t] != IGNORE_INDEX and ids[t] != tiny_tokenizer.eos_token_id:
                assert (labels[t] == IGNORE_INDEX) == (p[t - 1].item() > tau)
        first = next(t for t in range(1, len(ref)) if ref[t] != IGNORE_INDEX)
        first_masked += labels[first] == IGNORE_INDEX
    assert first_masked > 0  # the first response token is scored, and masked when above tau
    assert _rows(tmp_path / "random") != _rows(tmp_path / "low")


def test_the_stop_token_is_never_masked(tmp_path, tiny_model, tiny_tokenizer, tiny_task_files):
    """The EOS that ends each response is made the least likely token (perplexity far above tau),
    and stays a target in every mode; nothing else is spared."""
    eos = tiny_tokenizer.eos_token_id
    I = IGNORE_INDEX
    labels, ppl = [I, I, 7, 8, eos], [9.0, 30.0, 1.5, 1e6]
    for mode in ("high", "random", "low"):
        out, n = mask_tokens(labels, ppl, 2.5, mode, random.Random(0), keep=frozenset({eos}))
        assert out[-1] == eos and n == 1 and sum(x == I for x in out[2:4]) == 1
    make_eos_prone(tiny_model, eos, bias=-30.0)  # EOS: perplexity ~e^30, far above any other token's
    task = _task(tiny_task_files)
    data = task.tokenize(task.load(task.split), tiny_tokenizer)
    with torch.no_grad():
        t = torch.tensor([data["input_ids"][0]])
        tau = float(F.cross_entropy(tiny_model(input_ids=t).logits[0, :-1], t[0, 1:], reduction="none").exp().median())
    manifest = token_mask(tiny_model, tiny_tokenizer, task, tmp_path / "m", tau=tau, mode="high")
    rows = _rows(tmp_path / "m")
    assert manifest["stats"]["masked_tokens"] > 0 and len(rows) == len(data) - manifest["stats"]["dropped"]
    assert all(ids[-1] == eos and labels[-1] == eos for ids, labels in rows)


def test_a_tau_masking_everything_writes_nothing(tmp_path, tiny_model, tiny_tokenizer, tiny_task_files):
    with pytest.raises(GenerationError, match="masks every response token"):
        token_mask(tiny_model, tiny_tokenizer, _task(tiny_task_files), tmp_path / "m", tau=1.0)
    assert not (tmp_path / "m").exists()
    with pytest.raises(GenerationError, match="mode must be"):
        token_mask(tiny_model, tiny_tokenizer, _task(tiny_task_files), tmp_path / "m", mode="middle")


def test_task_shards_replace_the_training_split(tmp_path, tiny_model_dir, tiny_task_files, tiny_task_shards,
                                                tiny_replay_dir):
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Question: {question}\nAnswer:",
                      response=" {answer}", shards=str(tiny_task_shards))
    dm = ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]["task"]
    shard_labels = {tuple(r["input_ids"].tolist()): r["labels"].tolist() for r in load_shards(tiny_task_shards)}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert labels[:n].tolist() == shard_labels[tuple(ids[:n].tolist())]  # the masked labels are trained on
    assert read_manifest(tiny_task_shards)["stats"]["masked_tokens"] > 0
    with pytest.raises(ValueError, match="give it as data.task.shards"):
        ReplayDataModule(_task(tiny_task_files), tokenizer=str(tiny_model_dir), replay_ratio=0.5,
                         replay=ReplayConfig(dir=str(tiny_task_shards))).setup("fit")
    wrong = TaskSource(path="json", data_files=tiny_task_files, shards=str(tiny_replay_dir))
    with pytest.raises(ValueError, match="give it as data.replay.dir"):
        ReplayDataModule(wrong, tokenizer=str(tiny_model_dir)).setup("fit")
