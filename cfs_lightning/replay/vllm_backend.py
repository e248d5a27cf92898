"""Context-free sampling through vLLM (GPU): the same records as `sample_context_free`, faster.

vLLM is an optional dependency (`pip install "cfs-lightning[vllm]"`), imported only when
`backend: vllm` is asked for. Each sequence i of batch b gets its own seed,
(seed * 1_000_003 + b) * batch_size + i, so a run is reproducible; the sequences differ from the
`hf` backend's for the same seed (another random-number stream), the distribution is the same.
With `store_topk`, vLLM's top-k log-probabilities of the raw model distribution are recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

from transformers import PreTrainedTokenizerBase

from ..sampling import GenerationError, SamplingConfig, fit_token_budget, trim_at_stop
from ..tokens import resolve_start_token


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise GenerationError(
            "backend='vllm' needs vLLM, which is not installed: pip install 'cfs-lightning[vllm]' "
            "(GPU machines), or use backend='hf'"
        ) from err
    return vllm


def sample_with_vllm(
    model: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SamplingConfig,
    max_sequences: int | None,
    max_tokens: int | None,
    stops: list[int],
    store_topk: int = 0,
    dtype: str = "auto",
) -> Iterator[list[dict]]:
    """Yield batches of records (`input_ids`, and the top-k columns with `store_topk`) sampled by
    vLLM from the checkpoint `model`, until the budget is met (a token budget is cut exactly).
    Sequences stop at the first of `stops` (`cfs_lightning.tokens.stop_token_ids`)."""
    vllm = _import_vllm()
    start_id = resolve_start_token(tokenizer, cfg.start_token)
    # generation_config="vllm": vLLM's neutral defaults, not the checkpoint's generation_config.json
    # (its repetition penalty, temperature or top-p would change the sampled distribution).
    llm = vllm.LLM(model=model, tokenizer=tokenizer.name_or_path, dtype=dtype, seed=cfg.seed,
                   max_logprobs=max(store_topk, 1), generation_config="vllm")
    done_seqs = done_tokens = batch = 0
    while (max_sequences is None or done_seqs < max_sequences) and (max_tokens is None or done_tokens < max_tokens):
        n = cfg.batch_size if max_sequences is None else min(cfg.batch_size, max_sequences - done_seqs)
        params = [vllm.SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p if cfg.top_p is not None else 1.0,
            top_k=cfg.top_k or -1, max_tokens=cfg.max_new_tokens,
            seed=(cfg.seed * 1_000_003 + batch) * cfg.batch_size + i,
            stop_token_ids=stops if cfg.stop_at_eos else None,
            ignore_eos=not cfg.stop_at_eos, logprobs=store_topk or None,
        ) for i in range(n)]
        outputs = llm.generate([{"prompt_token_ids": [start_id]}] * n, params, use_tqdm=False)
        records = [_record(out.outputs[0], start_id, stops, cfg, store_topk) for out in outputs]
        if max_tokens is not None:
            records = fit_token_budget(records, max_tokens - done_tokens)
        done_seqs += len(records)
        done_tokens += sum(len(r["input_ids"]) - 1 for r in records)
        batch += 1
        yield records


def _record(completion, start_id: int, stops: list[int], cfg: SamplingConfig, store_topk: int) -> dict:
    record = {"input_ids": trim_at_stop([start_id, *completion.token_ids], stops, cfg.stop_at_eos)}
    if store_topk:
        n_gen = len(record["input_ids"]) - 1
        steps = [sorted(step.items(), key=lambda kv: kv[1].rank)[:store_topk]  # the sampled token
                 for step in completion.logprobs[:n_gen]]                       # may come extra
        record["topk_ids"] = [[tok for tok, _ in step] for step in steps]
        record["topk_logprobs"] = [[lp.logprob for _, lp in step] for step in steps]
    return record
