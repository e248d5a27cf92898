"""Every kind of bad input is refused with a message that names the culprit and the fix, and
nothing is written when it is."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.experiments.runner import run_cli
from cfs_lightning.loading import BaseModelArgs
from cfs_lightning.replay.context_free import generate
from cfs_lightning.shards import ShardOutput
from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.tasks import TaskDataError, TaskSource
from cfs_lightning.evaluation import task_manager_for
from cfs_lightning.sampling import Budget, GenerationError, SamplingConfig
from cfs_lightning.shards import ReplayMismatchError
from cfs_lightning.replay.context_free import generate_replay
from cfs_lightning.tokens import TokenError

from .conftest import write_jsonl

GSM8K_TEMPLATE = dict(prompt="Q: {question}\nA:", response=" {answer}")


def _task(files, **kw):
    return TaskSource(path="json", data_files=files, **{**GSM8K_TEMPLATE, **kw})


def test_tokenizer_without_bos_and_no_start_token(tmp_path, tiny_model_dir):
    no_bos = tmp_path / "no_bos"
    shutil.copytree(tiny_model_dir, no_bos)
    tok = AutoTokenizer.from_pretrained(no_bos)
    tok.bos_token = None
    tok.save_pretrained(no_bos)
    with pytest.raises(TokenError, match=r"has no BOS token.*set `start_token` \(sampling.start_token in YAML\)"):
        generate(BaseModelArgs(str(no_bos), device="cpu"), ShardOutput(str(tmp_path / "r")), budget=Budget(sequences=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_bos"]  # nothing written


def _fit_args(tmp_path, model_dir, task_files, replay_dir, **model_args):
    config = {
        "trainer": {"accelerator": "cpu", "fast_dev_run": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "model": {"class_path": "cfs_lightning.training.CausalLMFineTuner",
                  "init_args": {"pretrained": str(model_dir), **model_args}},
        "data": {"class_path": "cfs_lightning.data.ReplayDataModule", "init_args": {
            "task": {"path": "json", "data_files": task_files, **GSM8K_TEMPLATE},
            "batch_size": 4, "replay_ratio": 0.5, "replay": {"dir": str(replay_dir), "val_size": 0}}},
        "export": {"enabled": False},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path)]


def _fit(args):
    cli = run_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_replay_from_another_model_or_tokenizer(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    other = tmp_path / "other"  # the same tokenizer, other weights
    shutil.copytree(tiny_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    for p in model.parameters():
        p.data.mul_(0.5)
    model.save_pretrained(other)
    with pytest.raises(ReplayMismatchError, match=r"were sampled from .* not from the model being fine-tuned.*"
                                                  r"replay.strict=false"):
        _fit(_fit_args(tmp_path, other, tiny_task_files, tiny_replay_dir))

    retok = tmp_path / "retok"  # another tokenizer: its vocabulary differs
    shutil.copytree(tiny_model_dir, retok)
    tok = AutoTokenizer.from_pretrained(retok)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(retok)
    dm = ReplayDataModule(_task(tiny_task_files), tokenizer=str(retok), replay_ratio=0.5,
                          replay=ReplayConfig(dir=str(tiny_replay_dir)))
    with pytest.raises(ReplayMismatchError, match=r"were tokenized by .* differs from the tokenizer in use.*"
                                                  r"regenerate them"):
        dm.setup("fit")


@pytest.mark.parametrize("ratio", [-1, "abc", math.nan, math.inf, True])
def test_negative_or_non_numeric_ratio(ratio, tiny_replay_dir):
    with pytest.raises(ValueError, match=r"data.replay_ratio must be a finite number >= 0 .* got"):
        ReplayDataModule(TaskSource(), replay_ratio=ratio, replay=ReplayConfig(dir=str(tiny_replay_dir)))


def test_non_numeric_ratio_on_the_command_line(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", *_fit_args(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir),
                 "--data.init_args.replay_ratio=lots"])
    err = capsys.readouterr().err
    assert "replay_ratio" in err and "lots" in err


@pytest.mark.parametrize("content", ["", "\n"], ids=["empty-file", "blank-line"])
def test_empty_task_dataset(tmp_path, content):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(TaskDataError, match=r"the 'train' split of 'json' .* has no records; point task.data_files"):
        _task({"train": str(tmp_path / "train.jsonl")}).load("train")


def test_empty_split_slice(tiny_task_files):
    with pytest.raises(TaskDataError, match="has no records"):
        _task(tiny_task_files).load("train[:0]")


@pytest.mark.parametrize("records, message", [
    ([{"question": "a", "answer": "1"}, {"question": "b"}], r"task record 1 has no 'answer' field .* ' \{answer\}'"),
    ([{"answer": "1"}, {"question": None, "answer": "2"}], r"task record 0 has no 'question' field .*task.prompt"),
    ([{"question": "a", "answer": [1, 2]}], r"task record 0 has a non-text 'answer' field \(got \[1, 2\]\)"),
], ids=["no-response", "no-prompt", "list-response"])
def test_record_missing_the_prompt_or_response_field(tmp_path, tiny_tokenizer, records, message):
    task = _task({"train": write_jsonl(tmp_path / "t.jsonl", records)})
    with pytest.raises(TaskDataError, match=message):
        task.tokenize(task.load("train"), tiny_tokenizer)


def test_sequence_longer_than_max_length_beyond_the_truncate_policy(tmp_path, tiny_tokenizer, caplog):
    records = [{"question": "a", "answer": "b"}, {"question": "word " * 40, "answer": "c"}]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", records)}
    strict = _task(files, max_length=16, long_sequences="error")
    with pytest.raises(TaskDataError, match=r"task record 1 is \d+ tokens long, more than task.max_length=16; "
                                            r"raise task.max_length, or set task.long_sequences"):
        strict.tokenize(strict.load("train"), tiny_tokenizer)
    dropping = _task(files, max_length=16, long_sequences="drop")
    assert len(dropping.tokenize(dropping.load("train"), tiny_tokenizer)) == 1
    assert "1 of 2 sequences (50.0%) were longer than task.max_length=16 and were dropped" in caplog.text
    with pytest.raises(TaskDataError, match="task.long_sequences must be truncate, drop or error, got 'cut'"):
        _task(files, long_sequences="cut")


def test_unknown_lm_eval_task_name():
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\].*`lm-eval ls tasks`"):
        task_manager_for(["arc_easy", "no_such_task"])


def test_unknown_task_fails_at_setup_before_training(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    args = _fit_args(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir)
    callback = json.dumps([{"class_path": "cfs_lightning.callbacks.RetainedEval",
                            "init_args": {"tasks": ["no_such_task"]}}])
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        _fit([*args, f"--trainer.callbacks={callback}"])


def test_regularizer_needing_a_reference_with_reference_none(tmp_path, tiny_model_dir, tiny_task_files,
                                                             tiny_replay_dir):
    args = _fit_args(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir, reference="none",
                     regularizers=[{"class_path": "cfs_lightning.training.regularizers.KLToReference"}])
    # jsonargparse reports the module's own error among the ways it tried to build the model
    with pytest.raises(ValueError, match=r"needs the frozen reference model .* model.reference='none'; "
                                         r"set it to 'copy'"):
        run_cli(args, run=False)


def test_yaml_with_an_unknown_key(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir, capsys):
    args = _fit_args(tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir)
    config = yaml.safe_load(open(args[1]))
    config["data"]["init_args"]["replay_ration"] = 0.1  # a typo
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(tmp_path / "typo.yaml")])
    err = capsys.readouterr().err
    assert "replay_ration" in err


def test_generation_settings_out_of_range():
    with pytest.raises(GenerationError, match="temperature must be > 0, got 0"):
        SamplingConfig(temperature=0)
    with pytest.raises(GenerationError, match=r"budget needs exactly one of sequences, tokens, fraction; got "
                                              r"\['sequences', 'tokens'\]"):
        Budget(sequences=3, tokens=4)


def test_store_topk_beyond_the_vocabulary_writes_nothing(tmp_path, tiny_model, tiny_tokenizer):
    with pytest.raises(GenerationError, match=r"store_topk must be in \[0, 512\)"):
        generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", SamplingConfig(max_new_tokens=2),
                        Budget(sequences=1), store_topk=600)
    assert not list(tmp_path.iterdir())
