"""Self-dialogue replay (SA-SFT, arXiv 2602.20162): the base model talks with itself.

Each dialogue opens with a user turn made from a seed instruction or topic (`seed_template`), then
the model alternates: as the assistant it answers the conversation so far (rendered with the
tokenizer's chat template); as the user it writes the next user message, prompted through the
same template with `user_template` over the transcript. Dialogue d uses seed `order[d]` of a
shuffle seeded by the sampling seed; turn t of batch b is sampled with seed (seed, b x turns + t).

Rows hold `input_ids` (the whole conversation through the chat template) and `labels`: the
assistant turns' tokens, and with `train_on_user_turns` the user turns' as well; the template's
headers are never targets. They are replay, mixed with the task by `data.replay_ratio` and
trained on with `NLLReplay`, which honours the labels.

A dialogue with an empty turn is dropped; one whose context outgrows `max_length` ends at its
last complete assistant turn (dropped if it has none); both are counted in the manifest.
"""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..chat import encode_chat
from ..loading import BaseModelArgs
from ..sampling import GenerationError, SamplingConfig, sample_continuations
from ..shards import ShardOutput, provenance, write_shards
from ..tokens import IGNORE_INDEX, eval_mode, stop_token_ids

USER_TEMPLATE = (
    "Here is a conversation between a user and an assistant.\n\n{transcript}\n\n"
    "Write the user's next message: a natural follow-up question or request. Reply with the "
    "message only."
)
"""Default prompt through which the model writes the user's next turn."""


def self_dialogue(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seeds: list[str],
    output_dir: str | Path,
    sampling: SamplingConfig,
    num_dialogues: int,
    turns: int = 2,
    max_length: int = 512,
    seed_template: str = "{seed}",
    user_template: str = USER_TEMPLATE,
    chat_template: str | None = None,
    train_on_user_turns: bool = False,
    shard_size: int = 10_000,
    overwrite: bool = False,
) -> dict:
    """Write `num_dialogues` self-dialogues of `turns` assistant turns each; return the manifest."""
    if not seeds:
        raise GenerationError("self-dialogue needs at least one seed instruction or topic (seeds)")
    if num_dialogues < 1 or turns < 1:
        raise GenerationError(f"num_dialogues and turns must be >= 1, got {num_dialogues}, {turns}")
    use_chat_template(tokenizer, chat_template)
    stats = {"dialogues": 0, "empty_turns": 0, "unfinished_turns": 0, "ended_early": 0,
             "too_long": 0, "truncated": 0, "target_tokens": 0}
    manifest = {
        **provenance(tokenizer, model), "source": "self_dialogue",
        "sampling": sampling.to_dict(), "turns": turns, "max_length": max_length,
        "seeds": len(seeds), "seed_template": seed_template, "user_template": user_template,
        "chat_template": tokenizer.chat_template, "train_on_user_turns": train_on_user_turns,
        "stats": stats,
    }
    order = list(range(len(seeds)))
    random.Random(sampling.seed).shuffle(order)
    openers = [seed_template.format(seed=seeds[order[d % len(order)]]) for d in range(num_dialogues)]
    talk = _Dialogues(model, tokenizer, sampling, turns, max_length, user_template, stats)

    def batches():
        for b, start in enumerate(range(0, num_dialogues, sampling.batch_size)):
            rows = []
            for messages in talk.run(openers[start: start + sampling.batch_size], b):
                ids, labels = encode_dialogue(tokenizer, messages, train_on_user_turns)
                stats["dialogues"] += 1
                stats["truncated"] += len(ids) > max_length
                stats["target_tokens"] += sum(x != IGNORE_INDEX for x in labels[1:max_length])
                rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
            yield rows
        if stats["dialogues"] == 0:  # before the manifest: nothing is left on disk
            raise GenerationError(f"every dialogue was dropped ({stats}); check the chat template, "
                                  "raise max_length or sampling.max_new_tokens")

    with eval_mode(model):
        return write_shards(output_dir, batches(), manifest, shard_size, overwrite)


def use_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    """Install `chat_template` (a Jinja string or a file path) or check the tokenizer has one."""
    if chat_template is not None:
        path = Path(chat_template)
        tokenizer.chat_template = path.read_text() if path.suffix == ".jinja" and path.is_file() else chat_template
    elif tokenizer.chat_template is None:
        raise GenerationError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template, which self-dialogue "
            "renders turns with: give chat_template (a Jinja template string or a .jinja file)"
        )


class _Dialogues:
    """Runs one batch of dialogues turn by turn."""

    def __init__(self, model, tok, cfg: SamplingConfig, turns: int, max_length: int,
                 user_template: str, stats: dict) -> None:
        self.model, self.tok, self.cfg, self.turns = model, tok, cfg, turns
        self.stops = stop_token_ids(tok, model)
        self.max_length, self.user_template, self.stats = max_length, user_template, stats

    def run(self, openers: list[str], batch_index: int) -> list[list[dict]]:
        live = {i: [{"role": "user", "content": text}] for i, text in enumerate(openers)}
        done: dict[int, list[dict]] = {}
        for t in range(2 * self.turns - 1):  # assistant, user, assistant, ...
            role = "assistant" if t % 2 == 0 else "user"
            prompts = {i: self._prompt(m, role) for i, m in live.items()}
            for i in [i for i, p in prompts.items() if len(p) >= self.max_length]:
                self._end(i, live, done)
                del prompts[i]
            if not prompts:
                break
            keys = list(prompts)
            outs = sample_continuations(self.model, self.tok, self.cfg, [prompts[i] for i in keys],
                                        batch_index * 2 * self.turns + t)
            for i, out in zip(keys, outs, strict=True):
                reply = out["input_ids"][out["n_prompt"]:]
                if not reply or reply[-1] not in self.stops:
                    self.stats["unfinished_turns"] += 1
                text = self.tok.decode(reply, skip_special_tokens=True).strip()
                if not text:
                    self.stats["empty_turns"] += 1
                    del live[i]
                    continue
                live[i].append({"role": role, "content": text})
        done.update(live)
        return [done[i] for i in sorted(done)]

    def _prompt(self, messages: list[dict], role: str) -> list[int]:
        if role == "user":
            transcript = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
            messages = [{"role": "user", "content": self.user_template.format(transcript=transcript)}]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def _end(self, i: int, live: dict, done: dict) -> None:
        messages = live.pop(i)
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if messages:
            self.stats["ended_early"] += 1
            done[i] = messages
        else:
            self.stats["too_long"] += 1


def encode_dialogue(tok: PreTrainedTokenizerBase, messages: list[dict],
                    train_on_user_turns: bool = False) -> tuple[list[int], list[int]]:
    """A conversation through the chat template: (input_ids, labels), the labels being the
    assistant turns (and the user turns' content with `train_on_user_turns`), -100 elsewhere."""
    roles = ("assistant", "user") if train_on_user_turns else ("assistant",)
    return encode_chat(tok, messages, roles, fix="give another chat_template")


def read_seeds(seeds: list[str] | None, seeds_file: str | None) -> list[str]:
    """Seed instructions from the list and/or a text file (one per non-empty line)."""
    found = list(seeds or [])
    if seeds_file is not None:
        found += [line.strip() for line in Path(seeds_file).read_text().splitlines() if line.strip()]
    return found


DIALOGUE_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=256, batch_size=32)
"""Self-dialogue defaults (SA-SFT, arXiv 2602.20162): temperature 0.7, top-p 0.9."""


def dialogue(
    base: BaseModelArgs,
    output: ShardOutput,
    num_dialogues: int,
    seeds: list[str] | None = None,
    seeds_file: str | None = None,
    seed_template: str = "{seed}",
    turns: int = 2,
    max_length: int = 512,
    train_on_user_turns: bool = False,
    chat_template: str | None = None,
    user_template: str = USER_TEMPLATE,
    sampling: SamplingConfig = DIALOGUE_SAMPLING,
) -> dict:
    """`cfs dialogue`: self-dialogue replay (SA-SFT), the base model writing multi-turn dialogues
    with itself through its chat template; mix them with the task as `data.replay.dir`.

    Args:
        base: The base model that writes both sides.
        output: The replay directory to write.
        num_dialogues: Dialogues to write (seeds are cycled in a seeded shuffle).
        seeds: Seed instructions or topics that open the dialogues.
        seeds_file: A text file of further seeds, one per line.
        seed_template: Turns a seed into the first user message, e.g. `Tell me about {seed}.`
        turns: Assistant turns per dialogue (user turns in between are model-written too).
        max_length: Tokens per dialogue at most; a dialogue ends at its last complete assistant
            turn that fits.
        train_on_user_turns: Also train on the user turns (default: assistant turns only).
        chat_template: Jinja chat template (string or `.jinja` file) for tokenizers without one.
        user_template: Prompt over `{transcript}` through which the model writes a user turn.
        sampling: Sampling settings (default temperature 0.7, top-p 0.9).
    """
    lm, tok = base.load()
    manifest = self_dialogue(lm, tok, read_seeds(seeds, seeds_file), output.dir, sampling, num_dialogues,
                             turns, max_length, seed_template, user_template, chat_template,
                             train_on_user_turns, output.shard_size, output.overwrite)
    print(f"{Path(output.dir)}: {manifest['num_sequences']} dialogues; {manifest['stats']}")
    return manifest
