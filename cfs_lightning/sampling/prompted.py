"""One batched `generate` over prompts: the one way every sampler draws from a model.

Context-free replay (`sample_context_free`: every prompt the start token alone), contextual
replay, self-dialogue, self-output targets and the online samplers all go through
`sample_continuations`, so they share the settings below: the model's raw softmax under
`SamplingConfig` alone, a reproducible seed per batch, and the same stop tokens. (Only the
optional vLLM backend of context-free replay, `replay.vllm_backend`, samples otherwise.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..tokens import pad_rows, pad_token_id, stop_token_ids
from .config import SamplingConfig
from .processors import TopKRecorder, logits_processors


def generation_config(cfg: SamplingConfig, stops: list[int], pad_id: int) -> GenerationConfig:
    """The settings `generate` runs with: greedy over the scores `logits_processors` returns, whose
    last step draws the sample itself, and nothing else (`without_checkpoint_settings` keeps the
    checkpoint's generation_config.json out)."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stops if cfg.stop_at_eos else [],
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        use_cache=True,
    )


@contextlib.contextmanager
def without_checkpoint_settings(model: torch.nn.Module) -> Iterator[None]:
    """`generate` with none of the checkpoint's own generation settings.

    transformers fills every field our `GenerationConfig` leaves unset from the model's
    `generation_config` (the checkpoint's generation_config.json), and hub checkpoints set fields
    that change the sampled distribution: `no_repeat_ngram_size`, `suppress_tokens`,
    `begin_suppress_tokens`, `bad_words_ids`, `min_new_tokens`, `sequence_bias`,
    `forced_eos_token_id`, `repetition_penalty`, ... For the block, the model (the transformers
    model inside a LoRA wrapper) holds a blank `GenerationConfig`, so that the samples and the
    recorded top-k are the model's raw softmax under `SamplingConfig` alone. Its stop tokens are
    read before (`stop_token_ids`).
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def trim_at_stop(row: list[int], stops: list[int], stop_at_eos: bool) -> list[int]:
    """Cut a generated row after its first stop token (position 0, the start token, is not looked
    at), with `stop_at_eos`; else return it whole."""
    if stop_at_eos:
        for t, token in enumerate(row[1:], 1):
            if token in stops:
                return row[: t + 1]
    return row


@torch.no_grad()
def sample_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SamplingConfig,
                         prompts: list[list[int]], batch_index: int, store_topk: int = 0) -> list[dict]:
    """One batched `generate` over `prompts` (left-padded), seeded by (cfg.seed, batch_index).

    Each record's `input_ids` is its prompt followed by the continuation, cut after its first stop
    token (`stop_token_ids`, with `cfg.stop_at_eos`); `n_prompt` is the prompt's length. With
    `store_topk=k`, `topk_ids` and `topk_logprobs` hold the model's k most likely next tokens and
    their log-probabilities (temperature 1) at every generated position. The caller's RNG is
    untouched.
    """
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    stops = stop_token_ids(tokenizer, model)
    vocab = model.get_output_embeddings().weight.size(0)
    ids, mask = (t.to(device) for t in pad_rows(prompts, pad_id, left=True))  # (B, T)
    recorder = TopKRecorder(store_topk) if store_topk else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            without_checkpoint_settings(model):
        torch.manual_seed(cfg.seed * 1_000_003 + batch_index)
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=generation_config(cfg, stops, pad_id),
            logits_processor=logits_processors(cfg, recorder, len(tokenizer) if vocab > len(tokenizer) else None),
        )
    records = []
    for prompt, row in zip(prompts, out[:, ids.size(1):].tolist(), strict=True):
        cont = trim_at_stop([None, *row], stops, cfg.stop_at_eos)[1:]
        records.append({"input_ids": prompt + cont, "n_prompt": len(prompt)})
    if recorder is not None:
        for rec, ids_k, logprobs in zip(records, *recorder.per_row(), strict=True):
            n_gen = len(rec["input_ids"]) - rec["n_prompt"]
            rec["topk_ids"], rec["topk_logprobs"] = ids_k[:n_gen], logprobs[:n_gen]
    return records
