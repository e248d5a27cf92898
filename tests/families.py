"""The model families of the compatibility matrix: a real (or faithfully built) tokenizer beside a
tiny random model of the matching architecture, saved as a `from_pretrained` directory with the
checkpoint's generation config.

Qwen3, Llama 3.1 and Gemma 3 use their real tokenizers (`tests/fixtures/tokenizers`, see its
NOTICE). GPT-2, GPT-NeoX/Pythia, OLMo and Phi-3 tokenizers are built here, offline, with those
checkpoints' special tokens and conventions on a byte-level BPE trained on Shakespeare. Widths
are tiny (hidden 16, 2 layers); the vocabularies are the real ones, padded as the real
checkpoints pad them (Qwen3: 151,936 rows for 151,669 tokens; Gemma 3: 262,208 for 262,145).
"""

from __future__ import annotations

import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "tokenizers"
SHAKESPEARE = REPO / "data" / "tinyshakespeare" / "train.txt"

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
"""Phi-3's chat format: `<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n`, and the EOS after the
last turn of a finished conversation; `<|end|>` is a stop token only through the generation config."""


@dataclass(frozen=True)
class Family:
    """One row of the matrix."""

    name: str
    model_type: str
    tokenizer: str
    """A folder of `tests/fixtures/tokenizers`, or one of the built styles (gpt2, neox, olmo, phi3)."""
    stops: tuple[str | int, ...]
    """The generation config's `eos_token_id`, as tokens (or ids)."""
    start: str
    """The token context-free samples start from."""
    config: dict
    start_token: str | None = None
    """What `sampling.start_token` must be set to (tokenizers without BOS)."""
    padded_vocab: int = 0
    """Embedding rows past the tokenizer's vocabulary, as the real checkpoint has them."""

    @property
    def chat(self) -> bool:
        return self.tokenizer in ("qwen3", "llama3_1", "gemma3", "phi3")


_SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256)

FAMILIES = [
    Family("llama", "llama", "llama3_1", (128001, 128008, 128009), "<|begin_of_text|>",
           dict(_SMALL, tie_word_embeddings=False)),
    Family("qwen3", "qwen3", "qwen3", ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>",
           dict(_SMALL, head_dim=8, tie_word_embeddings=True), start_token="<|endoftext|>", padded_vocab=267),
    Family("gemma3", "gemma3_text", "gemma3", ("<eos>", "<end_of_turn>"), "<bos>",
           dict(_SMALL, head_dim=8, sliding_window=16), padded_vocab=63),
    Family("gemma2", "gemma2", "gemma3", ("<eos>", "<end_of_turn>"), "<bos>",
           dict(_SMALL, head_dim=8, sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    Family("olmo", "olmo", "olmo", ("<|endoftext|>",), "<|endoftext|>",
           dict(_SMALL, tie_word_embeddings=False), start_token="<|endoftext|>", padded_vocab=40),
    Family("gpt2", "gpt2", "gpt2", ("<|endoftext|>",), "<|endoftext|>",
           dict(n_embd=16, n_layer=2, n_head=2, n_positions=256)),
    Family("gpt_neox", "gpt_neox", "neox", ("<|endoftext|>",), "<|endoftext|>",
           dict(_SMALL, tie_word_embeddings=False)),
    Family("phi3", "phi3", "phi3", ("<|endoftext|>", "<|assistant|>", "<|end|>"), "<s>",
           dict(_SMALL, tie_word_embeddings=False, pad_token_id=None)),
]
BY_NAME = {f.name: f for f in FAMILIES}


def real_tokenizer(name: str, out: Path) -> Path:
    """Decompress the fixture tokenizer `name` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for src in (FIXTURES / name).iterdir():
        if src.suffix == ".xz":
            (out / src.stem).write_bytes(lzma.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, out / src.name)
    return out


def _bpe(specials: list[str], vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(SHAKESPEARE)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def built_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """GPT-2 (BOS = EOS = `<|endoftext|>`, no pad), GPT-NeoX/Pythia (the same, `<|padding|>` in the
    vocabulary but not set), OLMo (no BOS, pad `<|padding|>`) and Phi-3 (`<s>` added by the
    tokenizer, EOS `<|endoftext|>`, turns ending with `<|end|>`) conventions."""
    if style == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if style in ("neox", "olmo"):
        tok = _bpe(["<|endoftext|>", "<|padding|>"])
        if style == "neox":
            return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                           eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|padding|>")
    if style == "phi3":
        tok = _bpe(["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                       unk_token="<unk>", pad_token="<|endoftext|>",
                                       additional_special_tokens=["<|assistant|>", "<|end|>", "<|user|>", "<|system|>"])
        fast.chat_template = PHI3_CHAT_TEMPLATE
        return fast
    raise ValueError(f"unknown tokenizer style {style!r}")


def stop_ids(family: Family, tok) -> list[int]:
    """The ids of the family's declared stop tokens."""
    ids = [s if isinstance(s, int) else tok.convert_tokens_to_ids(s) for s in family.stops]
    assert None not in ids, f"{family.name}: a declared stop token is not in the tokenizer"
    return ids


def build(family: Family, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str = "cpu") -> Path:
    """The family's tokenizer and a random model of its architecture (`family.config`), built on
    `device` in `dtype` and saved in `out`."""
    if (FIXTURES / family.tokenizer).is_dir():
        tok = AutoTokenizer.from_pretrained(real_tokenizer(family.tokenizer, out / "_tokenizer"))
    else:
        tok = built_tokenizer(family.tokenizer)
    stops = stop_ids(family, tok)
    fields = dict(family.config)
    fields.setdefault("pad_token_id", tok.pad_token_id)
    config = AutoConfig.for_model(family.model_type, vocab_size=len(tok) + family.padded_vocab,
                                  bos_token_id=tok.bos_token_id, eos_token_id=stops[0], **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stops,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    return out
