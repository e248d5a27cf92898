import json
import logging
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from cfs_lightning.callbacks import RetainedEval
from cfs_lightning.callbacks.retained_eval import tasks_key
from cfs_lightning.evaluation import task_specs
from cfs_lightning.scores import ITEM_CHANGES, item_changes
from cfs_lightning.data import ReplayDataModule
from cfs_lightning.tasks import TaskSource
from cfs_lightning.training import CausalLMFineTuner

from .conftest import REPO, write_jsonl

DOCS = ["To be, or not to be: that is the question.", "Friends, Romans, countrymen, lend me your ears.",
        "All the world's a stage."]
_SOURCE = """
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
"""
TASK_YAML = "task: toy_rolling" + _SOURCE + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""
CHOICE_YAML = "task: toy_choice" + _SOURCE + """output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: [" yes", " no"]
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_files(tmp_path):
    (tmp_path / "tasks" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "tasks" / "data" / "docs.jsonl", [{"text": d} for d in DOCS])
    rolling = tmp_path / "tasks" / "rolling.yaml"
    rolling.write_text(TASK_YAML.format(data="data/docs.jsonl"))  # relative to the YAML
    choice = tmp_path / "tasks" / "choice.yaml"
    choice.write_text(CHOICE_YAML.format(data="data/docs.jsonl"))
    return [str(rolling), str(choice)]


def _hand_bits_per_byte(model, tok) -> float:
    total, n_bytes = 0.0, 0
    for doc in DOCS:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(doc, add_special_tokens=False)])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.double().log_softmax(-1)
        total += logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
        n_bytes += len(doc.encode())
    return -total / n_bytes / math.log(2)


def test_scores_match_a_hand_computation_and_forget_is_signed(tmp_path, task_files, tiny_model_dir,
                                                               tiny_task_files, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the tasks folder: data_files must resolve against the YAML
    model = CausalLMFineTuner(str(tiny_model_dir), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    baseline_bpb = _hand_bits_per_byte(model.model.eval(), model.tokenizer)
    model.model.train()
    callback = RetainedEval(tasks=task_files, batch_size=2)
    dm = ReplayDataModule(TaskSource(path="json", data_files=tiny_task_files, prompt="{question}",
                                     response=" {answer}"), tokenizer=str(tiny_model_dir), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback],
                        default_root_dir=str(tmp_path))
    random.seed(7)
    torch.manual_seed(7)
    expected_draw = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    callback.evaluate(model)
    assert (random.random(), torch.rand(1)) == expected_draw  # lm-eval leaves the RNGs alone
    assert model.model.training  # and train mode is restored

    trainer.fit(model, datamodule=dm)
    start, end = callback.history
    assert start["eval/toy_rolling/bits_per_byte"] == pytest.approx(baseline_bpb, rel=1e-4)
    assert end["eval/toy_rolling/bits_per_byte"] == pytest.approx(
        _hand_bits_per_byte(model.model.eval(), model.tokenizer), rel=1e-4)
    assert start["forget/toy_rolling/bits_per_byte"] == 0.0
    # lower is better: forget = now - start
    assert end["forget/toy_rolling/bits_per_byte"] == pytest.approx(
        end["eval/toy_rolling/bits_per_byte"] - start["eval/toy_rolling/bits_per_byte"])
    assert end["forget/toy_rolling/bits_per_byte"] != 0.0
    # higher is better: forget = start - now
    assert end["forget/toy_choice/acc"] == pytest.approx(start["eval/toy_choice/acc"] - end["eval/toy_choice/acc"])
    assert trainer.callback_metrics["forget/toy_rolling/bits_per_byte"].item() == pytest.approx(
        end["forget/toy_rolling/bits_per_byte"])
    assert len(json.loads((Path(trainer.log_dir) / "retained_eval.json").read_text())) == 2
    # per item: only the 0-or-1 metric; what was gained less what was lost is the change in accuracy
    assert {k for k in end if k.startswith("items/")} == {f"items/toy_choice/acc/{c}" for c in ITEM_CHANGES}
    assert end["items/toy_choice/acc/gained"] - end["items/toy_choice/acc/forgotten"] == pytest.approx(
        end["eval/toy_choice/acc"] - start["eval/toy_choice/acc"])
    outcomes = callback.baseline_items["toy_choice/acc"]  # each document's outcome at fit start, chance 1/2
    assert sorted(outcomes) == ["0", "1", "2"] and {c for _, c in outcomes.values()} == {0.5}
    assert sum(v for v, _ in outcomes.values()) / 3 == pytest.approx(start["eval/toy_choice/acc"])


def test_bad_task_path_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        task_specs([str(tmp_path / "nope.yaml")])


def test_named_suites_expand_and_unknown_ones_are_refused():
    assert task_specs([], ["olmo_zero_shot"]) == ["arc_easy", "arc_challenge", "boolq", "hellaswag",
                                                  "openbookqa", "piqa", "sciq", "winogrande"]
    assert task_specs(["gsm8k"], ["gsm8k"]) == ["gsm8k"]  # a task named twice runs once
    with pytest.raises(ValueError, match="unknown task suite.*olmo_zero_shot"):
        RetainedEval(suites=["olmo"])
    with pytest.raises(ValueError, match="at least one entry in tasks or suites"):
        RetainedEval()


def test_every_n_epochs_without_fit_start_and_never_in_the_sanity_check(tmp_path, task_files, tiny_model_dir,
                                                                         tiny_task_files):
    model = CausalLMFineTuner(str(tiny_model_dir), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    callback = RetainedEval(tasks=task_files[:1], batch_size=2, every_n_epochs=2, on_fit_start=False)
    dm = ReplayDataModule(TaskSource(path="json", data_files=tiny_task_files, prompt="{question}",
                                     response=" {answer}", val_split="test"),
                          tokenizer=str(tiny_model_dir), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                        num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[callback], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=dm)
    assert [h["epoch"] for h in callback.history] == [1]  # after epoch 2 only (0-based 1)
    assert callback.history[0]["forget/toy_rolling/bits_per_byte"] == 0.0  # the first one is the baseline


def test_an_evaluation_shows_one_progress_line_of_ours_and_no_lm_eval_noise(task_files, tiny_model_dir, capsys,
                                                                          caplog):
    """lm-eval's bars (documents, requests, windows) and its warnings about in-memory models are
    left out; one line of ours counts the sequences scored: 3 rolling windows + 3 x 2 choices."""
    from cfs_lightning.evaluation import evaluate_lm
    from cfs_lightning.loading import load_causal_lm, load_tokenizer

    caplog.set_level(logging.INFO)
    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    evaluate_lm(model, tok, task_specs(task_files), batch_size=2)
    capsys.readouterr()  # the first evaluation also shows `datasets` preparing the task files, once
    for _ in range(2):
        evaluate_lm(model, tok, task_specs(task_files), batch_size=2)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    assert len(lines) == 2  # one per evaluation (redrawn in place with "\r")
    for line in lines:
        draws = [d for d in line.split("\r") if d.strip()]
        assert all(d.startswith("lm-eval toy_rolling, toy_choice:") for d in draws), draws
        assert "100%" in draws[-1] and "9/9" in draws[-1]
    noise = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval") and r.levelno >= logging.WARNING]
    assert not noise


def test_start_scores_are_reused_for_the_same_model_and_only_for_it(tmp_path, task_files, tiny_model_dir,
                                                                    tiny_task_files):
    """The second fit of the same base takes the first's fit-start scores without evaluating; a
    base with other weights evaluates and adds its own entry; the fits' later scores are their own."""
    cache = tmp_path / "study" / "start_scores.json"

    def fit(lr: float, perturb: bool = False):
        model = CausalLMFineTuner(str(tiny_model_dir), optimizer=lambda p: torch.optim.SGD(p, lr=lr))
        if perturb:
            with torch.no_grad():
                next(model.model.parameters()).add_(0.01)
        callback = RetainedEval(tasks=task_files[:1], batch_size=2, start_scores=str(cache))
        calls = []
        evaluate = callback.evaluate
        callback.evaluate = lambda m: calls.append(1) or evaluate(m)
        dm = ReplayDataModule(TaskSource(path="json", data_files=tiny_task_files, prompt="{question}",
                                         response=" {answer}"), tokenizer=str(tiny_model_dir), batch_size=8)
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback],
                            default_root_dir=str(tmp_path))
        trainer.fit(model, datamodule=dm)
        return callback.history, len(calls)

    key = "eval/toy_rolling/bits_per_byte"
    first, first_calls = fit(0.5)
    second, second_calls = fit(0.1)
    assert (first_calls, second_calls) == (2, 1)  # the second skipped its fit-start evaluation
    assert second[0][key] == first[0][key]
    assert second[1][key] != first[1][key]  # trained at another rate: its own end score
    third, third_calls = fit(0.5, perturb=True)
    assert third_calls == 2 and third[0][key] != first[0][key]
    assert len(json.loads(cache.read_text())) == 2
    # an entry written without per-item outcomes is evaluated again and replaced, not duplicated
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps([{k: v for k, v in e.items() if k != "items"} for e in entries]))
    _, fourth_calls = fit(0.5)
    entries = json.loads(cache.read_text())
    assert fourth_calls == 2 and len(entries) == 2 and sum("items" in e for e in entries) == 1


def test_the_start_scores_key_names_task_functions_without_memory_addresses():
    """A task's `!function` hooks enter the key by module and name: their repr's memory address
    differs from one process to the next, and a key holding it would miss the shared scores."""
    key = json.dumps(tasks_key([str(REPO / "configs" / "tasks" / "gsm8k_answers.yaml")]))
    assert " at 0x" not in key
    assert "gsm8k_answers.process_results" in key and "test_docs" in key


def _simulated(known_before: float, known_after: float, k: int, n: int = 40000) -> dict[str, float]:
    """Items known (always right) or guessed among k choices, the known ones nested: the first
    `known_after` of them still known after, the rest of the first `known_before` lost."""
    rng = random.Random(0)
    start, now = {}, {}
    for i in range(n):
        u = i / n
        start[str(i)] = [1.0 if u < known_before or rng.random() < 1 / k else 0.0, 1 / k]
        now[str(i)] = [1.0 if u < known_after or rng.random() < 1 / k else 0.0, 1 / k]
    return {key.rsplit("/", 1)[1]: v for key, v in item_changes({"t/acc": start}, {"t/acc": now}).items()}


def test_per_item_changes_count_flips_and_take_out_what_guessing_explains():
    start = {"t/acc": {"0": [1.0, 0.25], "1": [1.0, 0.25], "2": [0.0, 0.25], "3": [0.0, 0.25]},
             "t/exact": {"0": [1.0, 0.0], "1": [0.0, 0.0]}}
    now = {"t/acc": {"0": [0.0, 0.25], "1": [1.0, 0.25], "2": [1.0, 0.25], "3": [0.0, 0.25], "9": [1.0, 0.25]},
           "t/exact": {"0": [0.0, 0.0], "1": [0.0, 0.0]}}
    got = item_changes(start, now)
    # acc over the 4 shared documents: one 1->0, one 0->1; a0 = a1 = 1/2, so u = (1/2) / (3/4) = 2/3
    # are guessed both times, each flipping either way with probability 3/16: 1/8 of the items
    assert got["items/t/acc/forgotten"] == got["items/t/acc/gained"] == 0.25
    assert got["items/t/acc/forgotten_adjusted"] == pytest.approx((0.25 - 0.125) / 0.75)
    assert got["items/t/exact/forgotten"] == 0.5 and got["items/t/exact/gained"] == 0.0
    assert got["items/t/exact/forgotten_adjusted"] == 0.5  # nothing is guessed: the raw share
    guessing = _simulated(0.0, 0.0, k=4)  # a model that only guesses flips 3/16 of the items each way
    assert guessing["forgotten"] == pytest.approx(3 / 16, abs=0.01)
    assert guessing["forgotten_adjusted"] == pytest.approx(0.0, abs=0.015)
    losing = _simulated(0.6, 0.4, k=4)  # a fifth of the items lost, none gained
    assert losing["forgotten"] == pytest.approx(0.2 * 0.75 + 0.4 * 3 / 16, abs=0.01)
    assert losing["forgotten_adjusted"] == pytest.approx(0.2, abs=0.015)
    assert losing["gained_adjusted"] == pytest.approx(0.0, abs=0.015)
