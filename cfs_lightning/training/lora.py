"""LoRA adapters through `peft`: applying them, and saving a merged checkpoint plus the adapter."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_DIR = "adapter"
"""Sub-directory of an export that holds the LoRA adapter alone (`PeftModel.from_pretrained`)."""


@dataclass
class LoRA:
    """Low-rank adapters on the base model's linear layers; only the adapters train."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]), or `all-linear` (every linear but the head)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")



# LoRA settings are a model hyperparameter, so they are in every checkpoint: let checkpoints load
# with torch.load(weights_only=True), which otherwise refuses any class it does not know.
torch.serialization.add_safe_globals([LoRA])

def apply_lora(model: PreTrainedModel, options: LoRA) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (B = 0, so the output is unchanged at first)."""
    config = LoraConfig(task_type="CAUSAL_LM", r=options.r, lora_alpha=options.alpha,
                        lora_dropout=options.dropout, target_modules=options.target_modules)
    return get_peft_model(model, config)


def save_merged(model: PeftModel, out: str | Path) -> None:
    """Write the adapters merged into the base weights (a plain HF checkpoint) and, under
    `out/adapter/`, the adapter alone.

    The merge happens on a copy, so the training model keeps its separate adapters; the copy costs
    one model's memory while it is written.
    """
    out = Path(out)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(out)
    del merged
    model.save_pretrained(out / ADAPTER_DIR)


def unwrap(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model inside a LoRA wrapper (adapters still applied), or `model` itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_hf(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, out: str | Path) -> None:
    """Write `model` and `tokenizer` as a Hugging Face checkpoint; a LoRA model merged, with the
    adapter alone under `adapter/` (`save_merged`)."""
    if isinstance(model, PeftModel):
        save_merged(model, out)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
