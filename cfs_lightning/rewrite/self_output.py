"""Self-Output and Rephrase (arXiv 2501.14315): the task's targets rewritten by the base model.

Both write the task's training split again, each response replaced by one the base model wrote:
  - `self_output`: the model answers each task prompt itself;
  - `rephrase`: the model rewrites the reference response from a prompt template.
For every record `num_samples` responses are drawn (batch b of records seeded by (seed, b)), a
`Verifier` keeps the correct ones, and the one with the lowest perplexity under the base model
(over the response, given the task prompt) replaces the reference. A record with no correct
sample keeps its reference response (a fallback, counted). The shards hold `input_ids` and
`labels` (prompt masked) and are trained on as the task itself: `data.task.shards`.

Samples that end without a stop token (cut at `max_new_tokens`), are empty, or do not fit `task.max_length`
after the prompt are no candidates; prompts of `task.max_length` tokens or more are not sampled
(the record keeps its reference, as the task tokenization would treat it). Each is counted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..loading import BaseModelArgs
from ..sampling import GenerationError, SamplingConfig, sample_continuations
from ..shards import ShardOutput, provenance, write_shards
from ..tasks import TaskSource
from ..tokens import eval_mode, pad_token_id, stop_token_ids
from .scoring import per_token_nll, response_perplexity
from .verifiers import GSM8KAnswer, Verifier

REPHRASE_TEMPLATE = (
    "Rewrite the answer below in your own words. Keep every step of the reasoning and end with "
    "the final answer in the same format.\n\n{prompt}{response}\n\nRewritten answer:"
)
"""Default rephrase prompt; `{prompt}` and `{response}` are the task's rendered prompt and response."""

STAT_KEYS = ("records", "verified", "fallback", "dropped", "prompts_too_long", "samples",
             "correct_samples", "empty_samples", "unfinished_samples", "too_long_samples")


def self_generated_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSource,
    verifier: Verifier,
    output_dir: str | Path,
    sampling: SamplingConfig,
    num_samples: int = 4,
    method: Literal["self_output", "rephrase"] = "self_output",
    rephrase_template: str = REPHRASE_TEMPLATE,
    score_batch_size: int = 16,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Write the task's training split with model-written responses; return the manifest.

    `sampling.batch_size` counts sequences per `generate` call, i.e. records x `num_samples`.
    """
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    if method not in ("self_output", "rephrase"):
        raise GenerationError(f"method must be 'self_output' or 'rephrase', got {method!r}")
    records = list(task.load(task.split))
    if not records:
        raise GenerationError(f"the {task.split!r} split of {task.path!r} has no records")
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["records"] = len(records)
    manifest = {
        **provenance(tokenizer, model, kind="task"), "source": method,
        "task": task.describe(),
        "sampling": sampling.to_dict(), "num_samples": num_samples,
        "verifier": {"class_path": f"{type(verifier).__module__}.{type(verifier).__qualname__}",
                     "init_args": {k: repr(v) for k, v in vars(verifier).items()}},
        "rephrase_template": rephrase_template if method == "rephrase" else None,
        "stats": stats,
    }
    rephrase = dataclasses.replace(task, prompt=rephrase_template, response="{response}")
    with eval_mode(model):
        per_call = max(1, sampling.batch_size // num_samples)

        def batches():
            for i in range(0, len(records), per_call):
                yield _targets(model, tokenizer, task, verifier, sampling, num_samples,
                               rephrase if method == "rephrase" else None, records[i: i + per_call],
                               i, i // per_call, score_batch_size, stats)
            if stats["dropped"] == len(records):  # before the manifest: nothing is left on disk
                raise GenerationError(f"no record of {task.path!r} has a response token left "
                                      f"within task.max_length={task.max_length}")

        return write_shards(output_dir, batches(), manifest, shard_size, overwrite)


def _targets(model, tok, task: TaskSource, verifier: Verifier, cfg: SamplingConfig, n: int,
             rephrase: TaskSource | None, records: list[dict], first: int, batch_index: int,
             score_batch_size: int, stats: dict) -> list[dict]:
    """One batch of records: sample, verify, pick the lowest-perplexity correct response."""
    prompts = [task.prompt_ids(r, tok) for r in records]
    if rephrase is None:
        queries = prompts
    else:
        queries = [rephrase.prompt_ids({"prompt": task.prompt.format(**r) if task.prompt else "",
                                        "response": task.response.format(**r)}, tok) for r in records]
    sampled = [i for i, q in enumerate(queries) if len(q) < task.max_length]
    stats["prompts_too_long"] += len(records) - len(sampled)
    candidates: dict[int, list[list[int]]] = {i: [] for i in range(len(records))}
    stops = stop_token_ids(tok, model)
    if sampled:
        outs = sample_continuations(model, tok, cfg, [queries[i] for i in sampled for _ in range(n)], batch_index)
        for k, out in enumerate(outs):
            i = sampled[k // n]
            response = _usable(out["input_ids"][out["n_prompt"]:], len(prompts[i]), tok, stops, task, stats)
            if response is not None and _verify(verifier, tok.decode(response, skip_special_tokens=True),
                                                records[i], first + i):
                stats["correct_samples"] += 1
                candidates[i].append(response)
    chosen = _lowest_perplexity(model, tok, prompts, candidates, score_batch_size)
    rows = []
    for i, record in enumerate(records):
        stats["verified" if i in chosen else "fallback"] += 1
        row = task.example(record, tok, chosen.get(i))
        if row["num_targets"] == 0:
            stats["dropped"] += 1
            continue
        rows.append({"input_ids": row["input_ids"], "labels": row["labels"]})
    return rows


def _usable(response: list[int], n_prompt: int, tok, stops: list[int], task: TaskSource,
            stats: dict) -> list[int] | None:
    stats["samples"] += 1
    if not response or response[-1] not in stops:
        stats["unfinished_samples"] += 1
        return None
    if len(response) == 1 or not tok.decode(response, skip_special_tokens=True).strip():
        stats["empty_samples"] += 1
        return None
    if n_prompt + len(response) > task.max_length:
        stats["too_long_samples"] += 1
        return None
    return response


def _verify(verifier: Verifier, text: str, record: dict, index: int) -> bool:
    try:
        return bool(verifier(text, record))
    except Exception as exc:  # re-raised with the record named; nothing is written
        raise GenerationError(
            f"verifier {type(verifier).__name__} raised {type(exc).__name__} on task record "
            f"{index} ({exc}); fix the verifier or the record — no shard was written"
        ) from exc


def _lowest_perplexity(model, tok, prompts: list[list[int]], candidates: dict[int, list[list[int]]],
                       batch_size: int) -> dict[int, list[int]]:
    """Per record with correct samples, the one with the lowest response perplexity given its prompt."""
    flat = [(i, r) for i, rs in candidates.items() for r in rs]
    if not flat:
        return {}
    nll = per_token_nll(model, [prompts[i] + r for i, r in flat], pad_token_id(tok), batch_size)
    best: dict[int, tuple[float, list[int]]] = {}
    for (i, response), scores in zip(flat, nll, strict=True):
        ppl = response_perplexity(scores, len(prompts[i]))
        if i not in best or ppl < best[i][0]:
            best[i] = (ppl, response)
    return {i: response for i, (_, response) in best.items()}


SELF_OUTPUT_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=256, batch_size=32)
"""Self-Output / Rephrase defaults (arXiv 2501.14315): temperature 0.7, top-p 0.95."""


def self_output(
    base: BaseModelArgs,
    task: TaskSource,
    output: ShardOutput,
    verifier: Verifier = GSM8KAnswer(),
    num_samples: int = 4,
    sampling: SamplingConfig = SELF_OUTPUT_SAMPLING,
    score_batch_size: int = 16,
) -> dict:
    """`cfs self-output`: the base model answers each task prompt; the lowest-perplexity correct
    answer replaces the reference (which is kept where none is correct). Train with
    `data.task.shards`.

    Args:
        base: The base model that answers.
        task: The task whose training split is rewritten.
        output: The task shard directory to write.
        verifier: Decides which samples are correct (default: GSM8K `#### <number>` match).
        num_samples: Responses drawn per prompt.
        sampling: Sampling settings; `batch_size` counts prompts x num_samples per call.
        score_batch_size: Sequences per forward pass when scoring perplexity.
    """
    return _rewrite("self_output", base, task, output, verifier, num_samples, sampling, REPHRASE_TEMPLATE,
                    score_batch_size)


def rephrase(
    base: BaseModelArgs,
    task: TaskSource,
    output: ShardOutput,
    verifier: Verifier = GSM8KAnswer(),
    template: str = REPHRASE_TEMPLATE,
    num_samples: int = 1,
    sampling: SamplingConfig = SELF_OUTPUT_SAMPLING,
    score_batch_size: int = 16,
) -> dict:
    """`cfs rephrase`: the base model rewrites each reference response in its own words; rewrites
    the verifier accepts replace the reference. Train with `data.task.shards`.

    Args:
        base: The base model that rewrites.
        task: The task whose training split is rewritten.
        output: The task shard directory to write.
        verifier: Filters wrong rewrites (default: GSM8K `#### <number>` match).
        template: Rewrite prompt over `{prompt}` and `{response}`, the task's rendered prompt and
            response (through the chat template when `task.chat_template`).
        num_samples: Rewrites drawn per record; the lowest-perplexity correct one is kept.
        sampling: Sampling settings; `batch_size` counts records x num_samples per call.
        score_batch_size: Sequences per forward pass when scoring perplexity.
    """
    return _rewrite("rephrase", base, task, output, verifier, num_samples, sampling, template, score_batch_size)


def _rewrite(method: Literal["self_output", "rephrase"], base: BaseModelArgs, task: TaskSource,
             output: ShardOutput, verifier: Verifier, num_samples: int, sampling: SamplingConfig,
             template: str, score_batch_size: int) -> dict:
    lm, tok = base.load()
    manifest = self_generated_targets(lm, tok, task, verifier, output.dir, sampling, num_samples, method,
                                      template, score_batch_size, output.shard_size, output.overwrite)
    stats = manifest["stats"]
    print(f"{Path(output.dir)}: {manifest['num_sequences']} task sequences: "
          f"{stats['verified']} {method.replace('_', '-')} responses verified, {stats['fallback']} "
          f"kept their reference; {stats}")
    return manifest
