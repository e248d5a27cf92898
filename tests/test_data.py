import logging

import pytest
import torch

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.data import CyclingSampler, ReplayConfig, ReplayDataModule, replay_batch_size
from cfs_lightning.data.samplers import TaskSampler
from cfs_lightning.tasks import TaskDataError, TaskSource
from cfs_lightning.shards import ReplayMismatchError

from .conftest import write_jsonl


def _source(files, **kw):
    base = dict(path="json", data_files=files, prompt="Q: {question}\nA:", response=" {answer}")
    return TaskSource(**{**base, **kw})


def test_prompt_masking_is_exact(tmp_path, tiny_tokenizer):
    rows = [{"question": "Who art thou?", "answer": "A friend."}]
    src = _source({"train": write_jsonl(tmp_path / "t.jsonl", rows)})
    ex = src.tokenize(src.load("train"), tiny_tokenizer)[0]
    prompt = tiny_tokenizer.encode("Q: Who art thou?\nA:", add_special_tokens=False)
    response = tiny_tokenizer.encode(" A friend.", add_special_tokens=False)
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert ex["input_ids"] == [bos] + prompt + response + [eos]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + response + [eos]


def test_padding_is_masked_and_batches_are_streams(tmp_path, tiny_tokenizer, tiny_model_dir):
    rows = [{"question": "Q" * (i + 1), "answer": "yes " * (i + 1)} for i in range(4)]
    src = _source({"train": write_jsonl(tmp_path / "t.jsonl", rows)})
    dm = ReplayDataModule(src, tokenizer=str(tiny_model_dir), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"task"}
    b = batch["task"]
    pad = b["attention_mask"] == 0
    assert pad.any()
    assert (b["labels"][pad] == IGNORE_INDEX).all()
    assert (b["input_ids"][pad] == tiny_tokenizer.pad_token_id).all()


def test_truncation_is_counted_and_warned(tmp_path, tiny_tokenizer, caplog):
    rows = [{"question": "short", "answer": "word " * 50}, {"question": "q " * 40, "answer": "a"},
            {"question": "ok", "answer": "fine"}]
    src = _source({"train": write_jsonl(tmp_path / "t.jsonl", rows)}, max_length=24)
    with caplog.at_level(logging.WARNING):
        ds = src.tokenize(src.load("train"), tiny_tokenizer)
    assert "2 of 3 sequences" in caplog.text and "task.max_length=24" in caplog.text
    assert "1 had no response token left and were dropped" in caplog.text
    assert len(ds) == 2 and max(len(r) for r in ds["input_ids"]) == 24


def test_template_naming_a_missing_field_is_refused(tmp_path):
    src = _source({"train": write_jsonl(tmp_path / "t.jsonl", [{"q": 1, "answer": 2}])})
    with pytest.raises(TaskDataError, match=r"\['question'\].*fields are \['answer', 'q'\]"):
        src.load("train")


@pytest.mark.parametrize("ratio,bs,expected", [(0, 16, 0), (0.5, 16, 8), (0.1, 16, 2), (0.01, 16, 1),
                                                (1.0, 4, 4), (0.125, 4, 1), (2.0, 3, 6)])
def test_replay_ratio_arithmetic(ratio, bs, expected):
    assert replay_batch_size(ratio, bs) == expected


def test_cycling_sampler_sees_all_before_repeating_and_continues_across_epochs():
    s = CyclingSampler(n=5, num_samples=7, seed=0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    stream = e0 + e1
    assert len(e0) == 7
    for k in range(0, 10, 5):  # each block of 5 consecutive stream items is a permutation
        assert sorted(stream[k:k + 5]) == [0, 1, 2, 3, 4]
    s.set_epoch(0)
    assert list(s) == e0  # deterministic


def test_training_batches_mix_replay_at_the_ratio(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    dm = ReplayDataModule(_source(tiny_task_files), tokenizer=str(tiny_model_dir), batch_size=8,
                          replay_ratio=0.5, replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=10))
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = [b for b, *_ in loader]
    assert len(batches) == 8  # the epoch is the task data: 64 examples / 8
    assert all(b["replay"]["input_ids"].size(0) == 4 for b in batches)
    # replay: the 30 training sequences cycle; the 10 held-out ones never appear in training
    train_rows = {tuple(r.tolist()) for r in dm.datasets["replay_train"]["input_ids"]}
    val_rows = {tuple(r.tolist()) for r in dm.datasets["replay_val"]["input_ids"]}
    seen = set()
    for b in batches:
        for ids, mask in zip(b["replay"]["input_ids"], b["replay"]["attention_mask"]):
            seen.add(tuple(ids[mask.bool()].tolist()))
    assert seen == train_rows and not seen & val_rows
    labels = batches[0]["replay"]["labels"]
    assert (labels[batches[0]["replay"]["attention_mask"] == 1] != IGNORE_INDEX).all()


def test_grouping_by_length_pads_less_and_still_covers_every_example_once():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (1000,), generator=gen).tolist()
    batch = 8

    def padded(order):
        return sum(max(lengths[i] for i in order[k:k + batch]) * len(order[k:k + batch])
                   for k in range(0, len(order), batch))

    plain = list(TaskSampler(1000, seed=3))
    grouped = TaskSampler(1000, seed=3, lengths=lengths, batch_size=batch)
    order = list(grouped)
    assert sorted(order) == list(range(1000))  # every example once
    assert padded(order) < 0.7 * padded(plain)  # far less padding than a plain shuffle
    assert order == list(grouped)  # a function of (seed, epoch)
    grouped.set_epoch(1)
    assert list(grouped) != order  # reshuffled every epoch
    # two ranks split every step's batch of 2 x 8 similar lengths between them
    r0, r1 = (list(TaskSampler(1000, num_replicas=2, rank=r, seed=3, lengths=lengths, batch_size=batch))
              for r in (0, 1))
    assert sorted(r0 + r1) == list(range(1000))
    step = sorted(r0[:batch] + r1[:batch], key=lambda i: -lengths[i])
    assert max(lengths[i] for i in step) - min(lengths[i] for i in step) < 60


def test_max_passes_refuses_a_fit_that_would_cycle_the_replay(tiny_model_dir, tiny_task_files, tiny_replay_dir,
                                                               caplog):
    import lightning as L

    def loader(max_passes, epochs):
        dm = ReplayDataModule(_source(tiny_task_files), tokenizer=str(tiny_model_dir), batch_size=8,
                              replay_ratio=0.5, replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=10,
                                                                    max_passes=max_passes))
        dm.trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False)
        dm.setup("fit")
        return dm.train_dataloader()

    # 8 steps x 4 replay = 32 draws of 30 training sequences: two passes
    with caplog.at_level(logging.INFO, logger="cfs_lightning.data.datamodule"):
        loader(max_passes=2, epochs=1)
    assert "32 draws from 30 sequences, each seen up to 2 times" in caplog.text
    with pytest.raises(ValueError, match=r"replay.max_passes=2: .* 64 replay sequences .* up to 3 times; "
                                         r"generate at least 32"):
        loader(max_passes=2, epochs=2)


def test_validation_loaders_name_their_stream(tiny_model_dir, tiny_task_files, tiny_replay_dir):
    dm = ReplayDataModule(_source(tiny_task_files, val_split="test"), tokenizer=str(tiny_model_dir),
                          replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=10))
    dm.setup("validate")
    task_loader, replay_loader = dm.val_dataloader()
    assert set(next(iter(task_loader))) == {"task"}
    assert set(next(iter(replay_loader))) == {"replay"}
    assert sum(b["replay"]["input_ids"].size(0) for b in replay_loader) == 10


def test_val_dir_measures_replay_nll_on_another_set_and_trains_on_all_of_dir(
        tmp_path, tiny_model_dir, tiny_task_files, tiny_replay_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfs_lightning.sampling import Budget, SamplingConfig
    from cfs_lightning.replay.context_free import generate_replay
    from cfs_lightning.shards import load_shards

    held_out = tmp_path / "held_out"
    generate_replay(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir), held_out,
                    SamplingConfig(max_new_tokens=12, batch_size=8, seed=1), Budget(sequences=12))
    dm = ReplayDataModule(_source(tiny_task_files, val_split="test"), tokenizer=str(tiny_model_dir),
                          replay_ratio=0.5,
                          replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=10, val_dir=str(held_out)))
    dm.setup("fit")
    rows = lambda d: [tuple(r) for r in d["input_ids"]]  # noqa: E731
    assert rows(dm.datasets["replay_train"]) == rows(load_shards(tiny_replay_dir))  # nothing held out
    assert rows(dm.datasets["replay_val"]) == rows(load_shards(held_out))[-10:]
    _, replay_loader = dm.val_dataloader()
    assert sum(b["replay"]["input_ids"].size(0) for b in replay_loader) == 10


def test_shards_of_another_tokenizer_are_refused(tmp_path, tiny_task_files, tiny_replay_dir):
    from cfs_lightning.experiments.init_model import init_model

    from .conftest import SHAKESPEARE, TINY_LLAMA

    other = init_model(str(tmp_path / "other"), [str(SHAKESPEARE / "heldout.txt")], vocab_size=400,
                       model_config=TINY_LLAMA)
    dm = ReplayDataModule(_source(tiny_task_files), tokenizer=str(other),
                          replay=ReplayConfig(dir=str(tiny_replay_dir)))
    with pytest.raises(ReplayMismatchError, match="regenerate"):
        dm.setup("fit")


def test_missing_shards_without_generation_block_are_refused(tmp_path, tiny_model_dir, tiny_task_files):
    dm = ReplayDataModule(_source(tiny_task_files), tokenizer=str(tiny_model_dir),
                          replay=ReplayConfig(dir=str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="cfs generate"):
        dm.prepare_data()


def test_collated_task_batch_is_long(tiny_model_dir, tiny_task_files):
    dm = ReplayDataModule(_source(tiny_task_files), tokenizer=str(tiny_model_dir), batch_size=2)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))[0]["task"]
    assert all(t.dtype == torch.long for t in b.values())


def test_the_module_checks_the_replay_against_its_base_weights(tmp_path, tiny_model_dir, tiny_task_files,
                                                              tiny_replay_dir):
    import lightning as L

    from cfs_lightning.shards import read_manifest
    from cfs_lightning.training import CFSFineTuner

    dm = ReplayDataModule(_source(tiny_task_files), tokenizer=str(tiny_model_dir), batch_size=4, replay_ratio=0.5,
                          replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=2))
    dm.setup("fit")  # the DataModule holds no model: it lists what the model must match
    ((manifest, waiver),) = dm.shard_manifests.values()
    assert manifest == read_manifest(tiny_replay_dir) and "replay.strict=false" in waiver
    model = CFSFineTuner(str(tiny_model_dir))
    with torch.no_grad():
        next(model.model.parameters()).add_(1.0)  # no longer the weights the replay was sampled from
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ReplayMismatchError, match="not from the model being fine-tuned"):
        trainer.fit(model, datamodule=dm)



def test_rows_pad_right_for_training_and_left_for_generation():
    from cfs_lightning.tokens import pad_rows

    ids, mask = pad_rows([[5, 6, 7], [8]], value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], value=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
