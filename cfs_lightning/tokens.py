"""The special tokens every sampler and packer agrees on: where a sequence starts, where it stops,
and what separates documents; the label of positions without loss (`IGNORE_INDEX`), the padding
id and how rows are padded into a batch, and the eval mode models are sampled and scored in.

Checkpoints disagree on these. Llama-3.x Instruct's tokenizer EOS is `<|eot_id|>` (the end of a
chat turn) while documents end with `<|end_of_text|>`, and its generation config declares both
(plus `<|eom_id|>`). Qwen3's tokenizer EOS is `<|im_end|>` while documents end with
`<|endoftext|>`, and it has no BOS. Phi-3 ends chat turns with `<|end|>`, which only its
generation config names. Hence:

- **stop tokens** = the tokenizer's EOS ∪ the model's `generation_config.eos_token_id`, in that
  order (the set `transformers` itself stops at when generating with the checkpoint's config),
  then the document separator: a sequence that starts where a document starts also ends where
  a document ends (SmolLM2-Instruct's EOS and generation config name only `<|im_end|>`, which
  ends a chat turn, while its documents end with `<|endoftext|>`);
- **document separator** = the first special token of the tokenizer among the names checkpoints
  use for the end of a document (`DOCUMENT_SEPARATORS`), else its EOS;
- **start token** = the tokenizer's BOS, or the token the user names; without either the run is
  refused with advice naming the document separator (a context-free sample starts where a
  document would). A BOS that opens every turn of the tokenizer's chat template (SmolLM2's
  `<|im_start|>`) is a chat-turn marker, not a document start, and is refused the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt and padding); torch's cross_entropy default."""

DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>", "<｜end▁of▁sentence｜>")
"""Special tokens that end a document in pretraining data: GPT-2, Pythia, OLMo, Qwen and Phi
(`<|endoftext|>`); Llama 3 (`<|end_of_text|>`); Gemma (`<eos>`); Llama 2 and Mistral (`</s>`);
DeepSeek (`<｜end▁of▁sentence｜>`). Only special tokens count: Qwen3 and Gemma 3 also have an
ordinary `</s>` token."""


class TokenError(ValueError):
    """A tokenizer lacks a token the pipeline needs; the message names the setting that supplies it."""


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Every special token of `tokenizer`: those named in its map and added tokens marked special."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return added | set(tokenizer.all_special_tokens)


def _known_separator(tokenizer: PreTrainedTokenizerBase) -> str | None:
    specials = special_tokens(tokenizer)
    return next((name for name in DOCUMENT_SEPARATORS if name in specials), None)


def document_separator(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that ends a document (see `DOCUMENT_SEPARATORS`); the EOS when none is special."""
    known = _known_separator(tokenizer)
    if known is not None:
        return known
    if tokenizer.eos_token is None:
        raise TokenError(f"tokenizer {tokenizer.name_or_path!r} has neither an EOS token nor a known "
                         f"document separator {DOCUMENT_SEPARATORS}; set its eos_token")
    return tokenizer.eos_token


def resolve_start_token(tokenizer: PreTrainedTokenizerBase, start_token: str | None) -> int:
    """The id every context-free sequence starts from: `start_token`, else the tokenizer's BOS."""
    if start_token is None:
        if tokenizer.bos_token_id is None or opens_chat_turns(tokenizer, tokenizer.bos_token):
            separator = document_separator(tokenizer)
            why = ("has no BOS token" if tokenizer.bos_token_id is None else
                   f"has a BOS {tokenizer.bos_token!r} that opens every turn of its chat template "
                   "(samples started there are fragments after a turn marker)")
            raise TokenError(
                f"tokenizer {tokenizer.name_or_path!r} {why}, so context-free sampling "
                "has no start token: set `start_token` (sampling.start_token in YAML) to its "
                f"document separator {separator!r}, where a new document begins"
                + _not_turn_end(tokenizer, separator)
            )
        return tokenizer.bos_token_id
    token_id = tokenizer.convert_tokens_to_ids(start_token)
    # SmolLM2's unknown token is its document separator `<|endoftext|>`: naming it is fine
    if token_id is None or (token_id == tokenizer.unk_token_id and start_token != tokenizer.unk_token):
        raise TokenError(
            f"start_token {start_token!r} is not a single token of tokenizer "
            f"{tokenizer.name_or_path!r}; use one of its special tokens, e.g. the document "
            f"separator {document_separator(tokenizer)!r}"
        )
    return token_id


def opens_chat_turns(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether `token` opens each turn of the tokenizer's chat template: it occurs more than once
    in a rendered two-turn conversation (a document start, like Llama 3's BOS, occurs once)."""
    if not tokenizer.chat_template:
        return False
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    return rendered.count(token) > 1


def _not_turn_end(tokenizer: PreTrainedTokenizerBase, separator: str) -> str:
    if tokenizer.eos_token is None or tokenizer.eos_token == separator:
        return ""
    return (f" (not its EOS {tokenizer.eos_token!r}, which ends a chat turn and would make the "
            "samples chat-shaped)")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase,
                   source: PreTrainedModel | PeftModel | GenerationConfig | None = None) -> list[int]:
    """The ids sampling stops at: the tokenizer's EOS, then every `eos_token_id` the model's
    generation config declares (`source`: the model, also inside a LoRA wrapper, or its
    `GenerationConfig`), then the document separator, without repeats."""
    config = source.generation_config if isinstance(source, (PreTrainedModel, PeftModel)) else source
    declared = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(declared, int):
        declared = [declared]
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [int(i) for i in declared or [] if int(i) not in ids]
    separator = _known_separator(tokenizer)
    if separator is not None and tokenizer.convert_tokens_to_ids(separator) not in ids:
        ids.append(tokenizer.convert_tokens_to_ids(separator))
    if not ids:
        raise TokenError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token and the model "
                         "declares no generation_config.eos_token_id, so sampling cannot stop; set one")
    return ids


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (dropout off) for the block; its train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding carries
    no label and no attention, so its value never matters)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded with `value` to the longest: a (B, T) int64 tensor and its (B, T) int64
    attention mask, 1 on each row's own tokens.

    Right padding (training, scoring: no padding sits before a token) unless `left` (generation:
    each row's new tokens then follow its last token).
    """
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
