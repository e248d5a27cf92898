"""Which weights train: freezing by name or the bottom decoder blocks, and LLaMA-Pro block
expansion (identity-initialised copies of blocks inserted and trained alone)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from ..tokens import eval_mode
from .sharding import decoder_block_classes

OUTPUT_PROJECTIONS = frozenset({"o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj", "fc2"})
"""Leaf names of the layers that add a decoder block's attention and MLP results to the residual
stream: `o_proj`/`down_proj` (Llama, Qwen, Mistral, Gemma, OLMo, Phi-3), `c_proj` (GPT-2),
`dense`/`dense_4h_to_h` (GPT-NeoX, Pythia), `dense`/`fc2` (Phi-2). Zeroed, the block adds nothing."""


@dataclass
class Trainable:
    """What trains, when not every weight (`model.trainable` of `CausalLMFineTuner`)."""

    freeze: list[str] = field(default_factory=list)
    """Regular expressions: a parameter whose name one of them finds (`re.search`) is frozen."""
    freeze_bottom: int = 0
    """Freeze the input embeddings and the first n decoder blocks (arXiv 2501.13453 finds that
    freezing the bottom layers keeps much of what fine-tuning forgets). A tied output head is the
    embedding matrix and freezes with it."""
    expand_blocks: int = 0
    """LLaMA-Pro (arXiv 2401.02415; LLaMA-Factory `use_llama_pro`, ms-swift
    `llamapro_num_new_blocks`): after every (N / n)-th of the N decoder blocks insert a copy of it
    with its output projections zeroed, so the model computes exactly what it did; only the n new
    blocks train. The export is a plain checkpoint of N + n blocks."""

    def __post_init__(self) -> None:
        if self.freeze_bottom < 0 or self.expand_blocks < 0:
            raise ValueError(f"trainable.freeze_bottom and expand_blocks must be >= 0, got "
                             f"{self.freeze_bottom} and {self.expand_blocks}")
        for pattern in self.freeze:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"trainable.freeze: {pattern!r} is not a regular expression ({err})") from None


def decoder_blocks(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The qualified name and the `ModuleList` of the model's decoder blocks."""
    classes = tuple(decoder_block_classes(model))
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(isinstance(m, classes) for m in module):
            return name, module
    raise ValueError(f"{type(model).__name__} keeps its decoder blocks in no ModuleList of their own")


def apply_trainable(model: PreTrainedModel, trainable: Trainable, lora: bool = False) -> PreTrainedModel:
    """Expand and freeze `model` in place as `trainable` says; refuse a model left with nothing to
    train, and LoRA beside it (the adapters are then what trains)."""
    if lora:
        raise ValueError("model.trainable and model.lora both choose what trains: set one of them")
    if trainable.expand_blocks:
        expand_blocks(model, trainable.expand_blocks)
    name, blocks = decoder_blocks(model)
    if trainable.freeze_bottom > len(blocks):
        raise ValueError(f"trainable.freeze_bottom={trainable.freeze_bottom}, but the model has {len(blocks)} "
                         "decoder blocks")
    frozen = {id(p) for b in blocks[:trainable.freeze_bottom] for p in b.parameters()}
    if trainable.freeze_bottom:
        frozen |= {id(p) for p in model.get_input_embeddings().parameters()}
    patterns = [re.compile(p) for p in trainable.freeze]
    for pname, p in model.named_parameters():
        if id(p) in frozen or any(pattern.search(pname) for pattern in patterns):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model.trainable freezes every parameter ({trainable}); leave some to train")
    return model


def expand_blocks(model: PreTrainedModel, n: int) -> None:
    """LLaMA-Pro expansion in place (see `Trainable.expand_blocks`): the config, the blocks'
    `layer_idx` and per-layer attention types follow, so `save_pretrained` writes a checkpoint
    that reloads as the expanded model. Checked on a probe: the logits must not change."""
    name, blocks = decoder_blocks(model)
    if getattr(model.config, "expanded_blocks", None):
        raise ValueError("trainable.expand_blocks: this checkpoint was expanded already (its config lists "
                         "`expanded_blocks`); expand its base model instead")
    if n > len(blocks) or len(blocks) % n:
        raise ValueError(f"trainable.expand_blocks={n} must divide the model's {len(blocks)} decoder blocks "
                         "(one copy after every N / n-th)")
    probe = torch.arange(8, device=next(model.parameters()).device)[None] % model.config.vocab_size
    with eval_mode(model), torch.no_grad():
        before = model(input_ids=probe).logits
    every, expanded, copies, sources = len(blocks) // n, [], [], []
    for i, block in enumerate(blocks):
        expanded.append(block)
        if (i + 1) % every == 0:
            copies.append(_zeroed_copy(block))
            expanded.append(copies[-1])
            sources.append(i)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.ModuleList(expanded))
    for index, block in enumerate(expanded):  # the KV cache and per-layer masks index blocks by it
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    _expand_config(model.config, sources, len(expanded))
    # which blocks are new, in the export too: `model_fingerprint` hashes the model as its base
    model.config.expanded_blocks = {"prefix": name, "added": [i + k + 1 for k, i in enumerate(sources)]}
    model.requires_grad_(False)
    for block in copies:
        block.requires_grad_(True)
    with eval_mode(model), torch.no_grad():
        after = model(input_ids=probe).logits
    if not torch.allclose(before, after, rtol=1e-5, atol=1e-5):
        raise ValueError(f"trainable.expand_blocks: the copies of {type(blocks[0]).__name__} change the model's "
                         f"output; their output projections (by name: {sorted(OUTPUT_PROJECTIONS)}) are not all "
                         "that writes to the residual stream in this architecture")


def _zeroed_copy(block: nn.Module) -> nn.Module:
    """A copy of `block` whose output projections are zero, so that it adds nothing."""
    block = copy.deepcopy(block)
    zeroed = [m for name, m in block.named_modules() if name.rpartition(".")[2] in OUTPUT_PROJECTIONS]
    if not zeroed:
        raise ValueError(f"trainable.expand_blocks: {type(block).__name__} has no layer named one of "
                         f"{sorted(OUTPUT_PROJECTIONS)}, so its copy cannot start as the identity")
    with torch.no_grad():
        for module in zeroed:
            for p in module.parameters(recurse=False):
                p.zero_()
    return block


def _expand_config(config, sources: list[int], total: int) -> None:
    """The config of the expanded model: its block count and, where it has one, the attention type
    of each block (a copy takes its source's)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        expanded = []
        for i, kind in enumerate(types):
            expanded += [kind, kind] if i in sources else [kind]
        config.layer_types = expanded
    config.num_hidden_layers = total
