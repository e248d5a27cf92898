import json

import pytest
import torch
from datasets import Dataset

from cfs_lightning.sampling import Budget, GenerationError, SamplingConfig, sample_context_free
from cfs_lightning.shards import ReplayMismatchError, check_manifest, load_shards, model_fingerprint, read_manifest, tokenizer_fingerprint
from cfs_lightning.replay.context_free import generate_replay
from cfs_lightning.tokens import TokenError


def _sample(model, tok, cfg, n=None, tokens=None):
    return [rec["input_ids"] for recs in sample_context_free(model, tok, cfg, n, tokens) for rec in recs]


def test_sequences_start_with_one_bos_and_stop_after_eos(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=20, batch_size=8, seed=1)
    rows = _sample(tiny_model, tiny_tokenizer, cfg, n=20)
    assert len(rows) == 20
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    for row in rows:
        assert row[0] == bos and bos not in row[1:2]  # exactly one start token, no double BOS
        assert 2 <= len(row) <= 21
        if eos in row[1:]:
            assert row.index(eos, 1) == len(row) - 1  # nothing after the first EOS
        else:
            assert len(row) == 21
        assert tiny_tokenizer.pad_token_id not in row


def test_fixed_length_ignores_eos(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=12, batch_size=8, stop_at_eos=False)
    assert {len(r) for r in _sample(tiny_model, tiny_tokenizer, cfg, n=16)} == {13}


def test_same_seed_same_sequences_other_seed_differs(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=16, batch_size=4, seed=3)
    torch.manual_seed(123)
    a = _sample(tiny_model, tiny_tokenizer, cfg, n=10)
    after = torch.rand(1)
    torch.manual_seed(999)
    b = _sample(tiny_model, tiny_tokenizer, cfg, n=10)
    c = _sample(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=16, batch_size=4, seed=4), n=10)
    assert a == b
    assert a != c
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG stream is untouched


def test_default_sampling_is_untruncated_temperature_one(tiny_model, tiny_tokenizer):
    from cfs_lightning.sampling import InverseCDFSampler, TopKRecorder, logits_processors

    logits = torch.randn(3, tiny_model.config.vocab_size)
    chain = logits_processors(SamplingConfig(), TopKRecorder(2))
    assert isinstance(chain[0], TopKRecorder) and isinstance(chain[-1], InverseCDFSampler)
    assert len(chain) == 2  # no temperature, top-k or top-p step: p_base itself is sampled
    for k, p, t in ((5, None, 1.0), (None, 0.5, 1.0), (None, None, 0.7)):
        warped = logits
        for step in logits_processors(SamplingConfig(top_k=k, top_p=p, temperature=t))[:-1]:
            warped = step(None, warped)
        if k:
            assert (torch.isinf(warped).sum(-1) == logits.size(-1) - k).all()
        if p:
            kept = warped.isfinite()
            assert (logits.softmax(-1) * kept).sum(-1).ge(0.5).all() and kept.sum(-1).lt(logits.size(-1)).all()
        if t != 1.0:
            torch.testing.assert_close(warped, logits / t)
    # transformers adds no processor of its own: the scores generate decodes are the sampler's
    start = torch.full((3, 1), tiny_tokenizer.bos_token_id)
    out = tiny_model.generate(input_ids=start, attention_mask=torch.ones_like(start),
                              generation_config=_generation_config_for_test(tiny_tokenizer),
                              logits_processor=logits_processors(SamplingConfig()), output_scores=True,
                              output_logits=True, return_dict_in_generate=True)
    for scores, row in zip(out.scores, out.sequences[:, 1:].T, strict=True):
        assert (scores.isfinite().sum(-1) == 1).all() and torch.equal(scores.argmax(-1), row)


def _generation_config_for_test(tokenizer):
    from cfs_lightning.sampling import generation_config

    # no stop token: a finished row would be padded after its EOS, whatever the sampler says
    return generation_config(SamplingConfig(max_new_tokens=4, stop_at_eos=False), [tokenizer.eos_token_id],
                              tokenizer.pad_token_id)


def test_inverse_cdf_sampler_draws_from_the_softmax_and_never_a_masked_token():
    from cfs_lightning.sampling import InverseCDFSampler

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0, float("-inf")]]).repeat(20_000, 1)
    picked = InverseCDFSampler()(None, logits).argmax(-1)
    freq = torch.bincount(picked, minlength=6).double() / picked.numel()
    expected = logits[0].double().softmax(-1)
    assert freq[3] == 0 and freq[5] == 0
    # 20k draws: each frequency within 4 standard errors of its probability
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / picked.numel()).sqrt() + 1e-12).all()
    one_hot = torch.full((4, 6), float("-inf"))
    one_hot[torch.arange(4), torch.tensor([0, 5, 2, 3])] = 3.0
    assert InverseCDFSampler()(None, one_hot).argmax(-1).tolist() == [0, 5, 2, 3]


def test_token_budget_is_exact(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=10, batch_size=4)
    rows = _sample(tiny_model, tiny_tokenizer, cfg, tokens=57)
    assert sum(len(r) - 1 for r in rows) == 57


def test_budget_arithmetic():
    assert Budget(sequences=7).resolve() == (7, None)
    assert Budget(tokens=100).resolve() == (None, 100)
    assert Budget(fraction=0.1).resolve(task_size=4800) == (480, None)
    assert Budget(fraction=0.5).resolve(task_size=5) == (3, None)  # half rounds up
    assert Budget(fraction=0.001).resolve(task_size=10) == (1, None)  # never zero
    with pytest.raises(GenerationError, match="task"):
        Budget(fraction=0.1).resolve()
    with pytest.raises(GenerationError, match="exactly one"):
        Budget(sequences=1, tokens=2)
    with pytest.raises(GenerationError, match="exactly one"):
        Budget()
    with pytest.raises(GenerationError, match="> 0"):
        Budget(sequences=0)


def test_sampling_config_validation():
    with pytest.raises(GenerationError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingConfig(top_p=1.5)


def test_tokenizer_without_bos_is_refused_then_start_token_works(tiny_model, tiny_tokenizer):
    tiny_tokenizer.bos_token = None
    assert tiny_tokenizer.bos_token_id is None
    with pytest.raises(TokenError, match="set `start_token`.*to its document separator '</s>'"):
        _sample(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=4), n=2)
    cfg = SamplingConfig(max_new_tokens=4, start_token="</s>", stop_at_eos=False)
    rows = _sample(tiny_model, tiny_tokenizer, cfg, n=3)
    assert [r[0] for r in rows] == [tiny_tokenizer.eos_token_id] * 3
    with pytest.raises(TokenError, match="not a single token"):
        _sample(tiny_model, tiny_tokenizer, SamplingConfig(start_token="<nope>"), n=1)


def test_replay_directory_shards_and_manifest(tmp_path, tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=8, batch_size=4, seed=5)
    manifest = generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", cfg, Budget(fraction=0.5),
                               task_size=22, shard_size=5)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "manifest.json", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    on_disk = read_manifest(tmp_path / "r")
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["num_sequences"] == 11
    ds = load_shards(tmp_path / "r")
    assert len(ds) == 11
    assert on_disk["num_generated_tokens"] == sum(len(r) - 1 for r in ds["input_ids"])
    assert on_disk["model_fingerprint"] == model_fingerprint(tiny_model)
    assert on_disk["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer)
    assert on_disk["sampling"] == cfg.to_dict()
    assert on_disk["budget"]["max_sequences"] == 11 and on_disk["budget"]["task_size"] == 22
    assert on_disk["start_token_id"] == tiny_tokenizer.bos_token_id
    for key in ("package_version", "model", "versions", "created"):
        assert key in on_disk
    # same seed and settings -> byte-identical shards
    generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r2", cfg, Budget(sequences=11), shard_size=5)
    for name in ("shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"):
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes()


def test_manifest_mismatch_is_refused(tiny_replay_dir, tiny_model, tiny_tokenizer):
    manifest = read_manifest(tiny_replay_dir)
    check_manifest(manifest, tiny_tokenizer, tiny_model)  # matches: no error
    with torch.no_grad():
        tiny_model.lm_head.weight[0, 0] += 1.0
    with pytest.raises(ReplayMismatchError, match="replay.strict"):
        check_manifest(manifest, tiny_tokenizer, tiny_model)
    tiny_tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ReplayMismatchError, match="tokeniz"):
        check_manifest(manifest, tiny_tokenizer)


def test_shards_are_memory_mapped(tiny_replay_dir):
    ds = load_shards(tiny_replay_dir)
    assert isinstance(ds, Dataset) and len(ds) == 40
    assert all(t.cache_files for t in [ds]) and ds.cache_files[0]["filename"].endswith(".arrow")


def test_store_topk_records_the_base_distribution_without_changing_samples(tiny_model, tiny_tokenizer):
    cfg = SamplingConfig(max_new_tokens=10, batch_size=4, seed=3)
    plain = list(sample_context_free(tiny_model, tiny_tokenizer, cfg, None, 25))
    cached = [rec for recs in sample_context_free(tiny_model, tiny_tokenizer, cfg, None, 25, store_topk=5)
              for rec in recs]
    assert [r["input_ids"] for recs in plain for r in recs] == [r["input_ids"] for r in cached]
    assert sum(len(r["input_ids"]) - 1 for r in cached) == 25  # the token budget cut keeps them aligned
    for rec in cached:
        ids = torch.tensor([rec["input_ids"]])
        assert len(rec["topk_ids"]) == len(rec["topk_logprobs"]) == ids.size(1) - 1
        with torch.no_grad():
            logp = tiny_model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        top = logp.topk(5)
        assert torch.equal(top.indices, torch.tensor(rec["topk_ids"]))
        torch.testing.assert_close(top.values, torch.tensor(rec["topk_logprobs"]), rtol=0, atol=1e-4)
    with pytest.raises(GenerationError, match="store_topk"):
        next(sample_context_free(tiny_model, tiny_tokenizer, cfg, 1, None, store_topk=10_000))


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(_has_vllm(), reason="vLLM is installed: the missing-dependency error cannot occur")
def test_vllm_backend_without_vllm_is_a_clear_error_and_writes_nothing(tmp_path, tiny_model, tiny_tokenizer):
    from cfs_lightning.sampling import Budget, SamplingConfig
    from cfs_lightning.replay.context_free import generate_replay

    with pytest.raises(GenerationError, match=r"pip install 'cfs-lightning\[vllm\]'"):
        generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", SamplingConfig(), Budget(sequences=2),
                        backend="vllm")
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())
    with pytest.raises(GenerationError, match="backend must be"):
        generate_replay(tiny_model, tiny_tokenizer, tmp_path / "r", SamplingConfig(), Budget(sequences=2),
                        backend="sglang")


@pytest.mark.gpu
@pytest.mark.skipif(not (_has_vllm() and torch.cuda.is_available()), reason="needs vLLM and a CUDA device")
def test_vllm_backend_writes_the_replay_format(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfs_lightning.sampling import Budget, SamplingConfig
    from cfs_lightning.replay.context_free import generate_replay
    from cfs_lightning.shards import load_shards, read_manifest

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    generate_replay(model, tok, tmp_path / "r", SamplingConfig(max_new_tokens=16, batch_size=4),
                    Budget(tokens=50), store_topk=3, backend="vllm")
    manifest, data = read_manifest(tmp_path / "r"), load_shards(tmp_path / "r")
    assert manifest["backend"] == "vllm" and manifest["num_generated_tokens"] == 50
    for row in data:
        assert row["input_ids"][0] == tok.bos_token_id
        assert len(row["topk_ids"]) == len(row["input_ids"]) - 1 and len(row["topk_ids"][0]) == 3
