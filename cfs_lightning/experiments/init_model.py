"""A from-scratch model directory: a byte-level BPE tokenizer trained on text, and random weights.

`cfs init --config configs/toy/base/init.yaml` writes a directory that `from_pretrained` loads like any
hub checkpoint, so pretraining it is an ordinary `cfs fit` run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ..io import atomic_dir

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(files: list[str], vocab_size: int,
                    special_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the given special tokens (default BOS `<s>`, EOS `</s>`, PAD `<pad>`;
    GPT-2's kind is `{bos_token: <|endoftext|>, eos_token: <|endoftext|>}`, BOS == EOS, no PAD).

    Encoding adds no special tokens (GPT-2 style): cfs_lightning adds the start token itself, and
    lm-eval's rolling log-likelihood prepends BOS on its own, so a BOS-adding tokenizer would
    score a spurious BOS-after-BOS in every retained-ability document.
    """
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer training files not found: {missing}")
    special = special_tokens or SPECIAL_TOKENS
    unknown = sorted(set(special) - {"bos_token", "eos_token", "pad_token", "unk_token"})
    if unknown or "bos_token" not in special or "eos_token" not in special:
        raise ValueError(f"special_tokens: give bos_token and eos_token (and optionally pad_token, "
                         f"unk_token); got {sorted(special)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special.values())),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def init_model(
    output_dir: str,
    text_files: list[str],
    vocab_size: int = 2048,
    model_type: str = "llama",
    model_config: dict[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    special_tokens: dict[str, str] | None = None,
) -> Path:
    """Train the tokenizer, build a randomly initialised model, save both to `output_dir`.

    Args:
        output_dir: Directory to write (config.json, weights, tokenizer files).
        text_files: Plain-text files the tokenizer is trained on.
        vocab_size: BPE vocabulary size, special tokens included.
        model_type: A transformers model type with a causal-LM head, e.g. `llama`.
        model_config: Config fields for that model type (hidden_size, num_hidden_layers, ...).
        seed: Seed of the weight initialisation.
        overwrite: Replace an existing `output_dir`.
        special_tokens: The tokenizer's special tokens (see `train_tokenizer`); default BOS `<s>`,
            EOS `</s>`, PAD `<pad>`.
    """
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite=true to replace it")
    tokenizer = train_tokenizer(text_files, vocab_size, special_tokens)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(model_config or {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
