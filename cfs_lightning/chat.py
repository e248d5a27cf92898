"""A conversation through the tokenizer's chat template, with the trained turns marked.

The conversation is rendered once, as the template renders it whole: that is the text the model
is trained on. Templates do not always render a turn the same way in every position: Qwen3's
writes an (empty) `<think>` block into the last assistant turn only, so a conversation's
rendering up to turn k is not a prefix of the whole. Each trained turn is therefore located in
the whole rendering itself:

- its content is where two renderings that differ only in that message's content (one
  character each) differ;
- an assistant turn starts where the template's generation prompt for it ends (what a model
  writes after that prompt is the turn: Qwen3's `<think>` block, the reply, its end-of-turn);
  a user turn starts at its content;
- a turn ends after the text the template closes a turn of that role with (what follows the
  message when it is the last one rendered, e.g. `<|im_end|>\\n`, `<|eot_id|>`, as far as the
  conversation goes on with the same tokens).

A template whose generation prompt is not a prefix of the whole rendering, or that drops part of
the last message (DeepSeek-R1's removes the text before `</think>`), is refused: its turns cannot
be trained on as written.
"""

from __future__ import annotations

import os

from transformers import PreTrainedTokenizerBase

from .tokens import IGNORE_INDEX

_SENTINELS = ("\x01", "\x02")


class ChatTemplateError(ValueError):
    """A chat template renders conversations in a way whose turns cannot be masked."""


def render(tok: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages`."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def turn_spans(tok: PreTrainedTokenizerBase, messages: list[dict], roles: set[str],
               fix: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The whole rendering of `messages` and (role, start, end) character spans of its turns of `roles`.

    Args:
        fix: What the user can do when the template is refused (ends the error message).
    """
    text = render(tok, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] not in roles:
            continue
        head, tail = _around_content(tok, messages, k)
        content_end = len(text) - len(tail)
        if message["role"] == "assistant":
            start = _generation_prompt_end(tok, messages, k, text, content_end, fix)
        elif text.startswith(head) and len(head) <= content_end:
            start = len(head)
        else:
            raise ChatTemplateError(
                f"the chat template of {tok.name_or_path!r} renders the text before message {k} "
                f"({message['role']}) differently depending on its content, so the turn cannot be "
                f"located; {fix}")
        if not text.endswith(tail) or start > content_end:
            raise ChatTemplateError(
                f"the chat template of {tok.name_or_path!r} renders the text after message {k} "
                f"({message['role']}) differently depending on its content, so the turn cannot be "
                f"located; {fix}")
        end = _turn_end(tok, messages, k, text, content_end)
        if k == len(messages) - 1:
            _check_kept(tok, message, text[start:content_end], fix)
        spans.append((message["role"], start, end))
    return text, spans


def encode_chat(tok: PreTrainedTokenizerBase, messages: list[dict], roles: tuple[str, ...] = ("assistant",),
                fix: str = "give another chat template") -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: labels are the turns of `roles`, -100 elsewhere.

    Each assistant turn and the text between them are tokenized apart, as a model meets them (a
    prompt, then what it writes), so a token never straddles a header and a reply; the tokens do
    not depend on `roles`. A user turn is labelled by its tokens' character offsets (a token
    that overlaps the turn is trained on).
    """
    text, located = turn_spans(tok, messages, {"assistant", *roles}, fix)
    spans = [(start, end) for role, start, end in located if role == "assistant"]
    trained = [(start, end) for role, start, end in located if role in roles]
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in [*spans, (len(text), len(text))]:
        for lo, hi in ((pos, start), (start, end)):
            if lo == hi:
                continue
            enc = tok(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
            for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                ids.append(token)
                keep = any(lo + a < t_end and lo + max(b, a + 1) > t_start for t_start, t_end in trained)
                labels.append(token if keep else IGNORE_INDEX)
        pos = end
    return ids, labels


def _around_content(tok, messages: list[dict], k: int) -> tuple[str, str]:
    """The text the template renders before and after message k's content (from two renderings
    whose only difference is one character of that content)."""
    a, b = (render(tok, _with_content(messages, k, s)) for s in _SENTINELS)
    return _common_prefix(a, b), _common_suffix(a, b)


def _generation_prompt_end(tok, messages: list[dict], k: int, text: str, content_end: int, fix: str) -> int:
    prompt = render(tok, messages[:k], add_generation_prompt=True)
    if not text.startswith(prompt) or len(prompt) > content_end:
        raise ChatTemplateError(
            f"the chat template of {tok.name_or_path!r} does not render the generation prompt before "
            f"assistant turn {k} as a prefix of the conversation ({prompt[-40:]!r} is not followed "
            f"by the turn), so the turn cannot be masked; {fix}")
    return len(prompt)


def _turn_end(tok, messages: list[dict], k: int, text: str, content_end: int) -> int:
    """Where message k's turn ends: after the text the template closes it with (its end-of-turn
    tokens). A template may write more after the last message (Phi-3's `<|end|>\n` then its EOS),
    so a turn inside the conversation ends where the closing it gets as the last message and the
    text that follows it part, rounded down to a whole token of that closing."""
    if k == len(messages) - 1:
        return len(text)
    closing = _common_suffix(*(render(tok, _with_content(messages[: k + 1], k, s)) for s in _SENTINELS))
    shared = len(_common_prefix(closing, text[content_end:]))
    offsets = tok(closing, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return content_end + max([end for _, end in offsets if end <= shared], default=0)


def _check_kept(tok, message: dict, rendered: str, fix: str) -> None:
    """The last message must be rendered whole (whitespace aside): a template that drops part of
    it (DeepSeek-R1's drops the reasoning before `</think>`) would train on something else."""
    if " ".join(message["content"].split()) not in " ".join(rendered.split()):
        raise ChatTemplateError(
            f"the chat template of {tok.name_or_path!r} does not render the {message['role']} turn "
            f"as given (it renders {rendered[:60]!r}... for {message['content'][:60]!r}...), so "
            f"training on it would train on other text; {fix}")


def _with_content(messages: list[dict], k: int, content: str) -> list[dict]:
    return [{**m, "content": content} if i == k else m for i, m in enumerate(messages)]


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def _common_suffix(a: str, b: str) -> str:
    return os.path.commonprefix([a[::-1], b[::-1]])[::-1]
