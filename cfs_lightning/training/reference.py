"""The frozen reference model p_ref that KL regularizers compare the trainable model against."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..tokens import eval_mode
from .heads import OutputHead, backbone, reproduces_logits
from .sharding import is_sharded, shard_fsdp2

REFERENCE_MODES = ("auto", "none", "copy", "adapters_disabled")


class ReferenceError(ValueError):
    """A reference model was asked for that cannot be built; the message names the fix."""


class _ReferenceNet(nn.Module):
    """The reference's backbone and output head behind one `forward`.

    One module, so that a sharded reference gathers its root unit (embeddings, final norm, head)
    in its own forward, also when the KL recomputes a head chunk in the backward pass. The head's
    output is post-processed as the model's own forward does (`postprocess_logits`).
    """

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.lm = causal_lm

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is not None:  # (B, c, H) -> (B, c, V)
            return OutputHead(self.lm)(hidden)
        return backbone(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class FrozenReference:
    """Next-token distributions of the initial model, frozen.

    Two ways to hold it:
      - `copy`: a deep copy of the initial weights, `eval()` (dropout off), `requires_grad_(False)`
        (with LoRA, a plain model: the copy's adapters, still zero, folded into its weights).
        It is deliberately not a submodule of the LightningModule, so it is never in the
        optimizer, in `state_dict()` or in checkpoints (which therefore load into a module with
        or without it); `to()` places it beside the trainable model at fit start, and under FSDP2
        `shard()` shards it per decoder block, in units of its own.
      - `adapters_disabled`: the trainable LoRA model itself, run in eval mode with its adapters
        switched off, i.e. the base weights: no second copy in memory.

    `hidden_states` returns the reference's final hidden states (B, T, H) and `logits` applies its
    output head to any slice of them, so a caller can form (B, c, V) reference logits a chunk of
    c positions at a time instead of (B, T, V) at once.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        if mode == "copy":
            frozen = copy.deepcopy(model)
            if isinstance(frozen, PeftModel):  # a plain model: the adapters folded into its weights
                frozen = frozen.merge_and_unload()
            self.model = frozen.eval().requires_grad_(False)
        elif mode == "adapters_disabled":
            if not isinstance(model, PeftModel):
                raise ReferenceError(
                    "reference='adapters_disabled' reuses the LoRA model with its adapters off, but "
                    "the model has no LoRA adapters: set model.lora, or use reference='copy'"
                )
            self.model = model
        else:
            raise ReferenceError(f"reference mode must be 'copy' or 'adapters_disabled', got {mode!r}")
        self.mode = mode
        causal_lm = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        self.net = _ReferenceNet(causal_lm)
        self._check_head(causal_lm)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        if self.mode == "copy":
            with torch.no_grad():
                yield
            return
        # The trainable model itself: dropout off (also in the LoRA layers) and adapters off for
        # the block, its train mode restored after.
        with eval_mode(self.model), torch.no_grad(), self.model.disable_adapter():
            yield

    @contextlib.contextmanager
    def as_causal_lm(self) -> Iterator[nn.Module]:
        """The reference as a whole causal LM, e.g. to sample from (`OnlineReplay`): the frozen
        copy, or the LoRA model in eval mode with its adapters off; without gradient."""
        with self._frozen():
            yield self.model

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) final hidden states of the reference, without gradient."""
        with self._frozen():
            return self.net(input_ids=input_ids, attention_mask=attention_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, c, V) reference logits of (B, c, H) hidden states, without gradient."""
        with self._frozen():
            return self.net(hidden=hidden)

    @contextlib.contextmanager
    def head_gathered(self) -> Iterator[None]:
        """Keep a sharded reference's root unit (embeddings, final norm, head) gathered for the
        block, so that `logits` on any number of chunks costs one all-gather on every rank. Each
        rank has its own number of target tokens, hence of chunks: gathered per chunk, the ranks
        would join different numbers of collectives and wait on each other for ever. A no-op
        unsharded. Every rank must enter it."""
        if not is_sharded(self.net):
            yield
            return
        self.net.set_reshard_after_forward(False, recurse=False)
        self.net.unshard()
        try:
            yield
        finally:
            self.net.reshard()
            self.net.set_reshard_after_forward(True, recurse=False)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> FrozenReference:
        """Move a `copy` reference beside the trainable model (a no-op for `adapters_disabled`
        and for a sharded copy, which `fully_shard` already placed)."""
        if self.mode == "copy" and not is_sharded(self.net):
            self.model.to(device=device, dtype=dtype)
        return self

    def shard(self, mesh: DeviceMesh) -> None:
        """FSDP2: shard a `copy` reference per decoder block, its root (embeddings, final norm,
        head) as one more unit, resharded after each use; never in a unit with trainable weights."""
        if self.mode != "copy":
            raise ReferenceError(
                "reference='adapters_disabled' cannot be used with a sharded model (its frozen "
                "weights live inside the trainable units); set model.reference='copy'"
            )
        shard_fsdp2(self.net, mesh, reshard_after_forward=True)

    def _check_head(self, causal_lm: nn.Module) -> None:
        """Refuse an architecture whose logits the chunked head does not reproduce."""
        with self._frozen():  # the whole model's logits too: eval mode, adapters off
            same = reproduces_logits(causal_lm, self.hidden_states, self.logits)
        if not same:
            raise ReferenceError(
                f"{type(causal_lm).__name__} transforms its logits after the output head in a way "
                "the reference's chunked head does not reproduce (cfs_lightning applies "
                "final_logit_softcapping only); KL regularizers cannot use this architecture"
            )


def resolve_reference_mode(mode: str, needed_by: Sequence[str], lora: bool) -> str:
    """The reference mode to build: `auto` builds one only when something needs it (`needed_by`
    names who), `adapters_disabled` with LoRA, else `copy`."""
    if mode not in REFERENCE_MODES:
        raise ReferenceError(f"model.reference must be one of {REFERENCE_MODES}, got {mode!r}")
    if mode == "auto":
        return ("adapters_disabled" if lora else "copy") if needed_by else "none"
    if mode == "none" and needed_by:
        raise ReferenceError(
            f"{' and '.join(needed_by)} need{'s' if len(needed_by) == 1 else ''} the frozen reference model "
            "(the initial weights, frozen), but model.reference='none'; set it to 'copy' (or "
            "'adapters_disabled' with LoRA) or 'auto'"
        )
    if mode == "adapters_disabled" and not lora:
        raise ReferenceError(
            "model.reference='adapters_disabled' needs LoRA adapters to switch off: set model.lora, "
            "or use reference='copy'"
        )
    return mode


def build_reference(model: nn.Module, mode: str, needed_by: Sequence[str], lora: bool) -> FrozenReference | None:
    """The frozen reference of `model` as `mode` (`model.reference`) and its users ask, or None.

    Built once per module, when its first fit or evaluation sets up: then its users are all
    known (the regularizers, and the stream producers that sample from it), and the trainable
    model still holds the weights the fit starts from (a checkpoint is restored later).

    Args:
        model: The trainable model (with LoRA: the peft model, whose adapters `adapters_disabled`
            switches off).
        mode: `auto`, `none`, `copy` or `adapters_disabled`.
        needed_by: Who reads the reference (for `auto`, and for the error under `none`).
        lora: Whether the model trains LoRA adapters.
    """
    mode = resolve_reference_mode(mode, needed_by, lora)
    return None if mode == "none" else FrozenReference(model, mode)
