"""Per-token full-vocabulary divergence to the frozen reference (arXiv 2505.13811, 2605.26097), or
to a teacher checkpoint (distillation)."""

from __future__ import annotations

from typing import Literal

import torch

from ...loading import load_causal_lm, load_tokenizer
from ...shards import tokenizer_fingerprint
from ...streams import ONPOLICY, REPLAY, TASK
from ..heads import Logits
from ..losses import chunked_target_mean, token_divergence
from ..reference import FrozenReference
from ..sharding import data_parallel_mesh
from .base import Regularizer
from .kl_cached_topk import topk_forward_kl


class KLToReference(Regularizer):
    """Mean per-token divergence between the frozen reference and the trainable model.

    On replay sequences (`on="replay"`) every non-padding next-token position counts; on task
    data (`on="task"`) and on on-policy samples (`on="onpolicy"`) only the response positions
    (those with a label). See `token_divergence`
    for `direction`, `beta` and `temperature`. Needs the module's frozen reference (built
    automatically: a frozen copy, or the LoRA model with adapters off).

    Distillation from any teacher (`teacher`: another checkpoint, such as an earlier fine-tune,
    which ms-swift's documentation recommends against forgetting): the term compares with that
    model instead, loaded once when the fit sets up, frozen (eval mode, no gradient), sharded
    like the reference under FSDP2, never in the optimizer or in checkpoints; the module's own
    reference (and the forgetting meter) stays the base. With `OnlineReplay(lmbda=...)` and
    `beta` these are the controls of GKD as TRL, ms-swift and NeMo-RL expose them; `top_k` takes
    the teacher's k most likely tokens only (forward KL coarsened to them, `topk_forward_kl`).

    Memory: the reference contributes its (B, T, H) final hidden states; the divergence is formed
    `chunk_size` target tokens at a time (`heads.head_sum`), both models' heads applied to one
    chunk, so the peak extra memory is a few chunk x V float32 values (the reference's logits,
    log p_ref and p_ref, `_ForwardKL`; more for the reverse KL and the JSD); neither model's
    (B, T, V) logits exist.
    """

    needs_reference = True

    def __init__(
        self,
        weight: float = 1.0,
        on: Literal["replay", "task", "onpolicy"] = REPLAY,
        direction: Literal["forward", "reverse"] = "forward",
        beta: float | None = None,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        teacher: str | None = None,
        top_k: int | None = None,
        name: str | None = None,
    ) -> None:
        """
        Args:
            weight: Multiplier of this term in the loss.
            on: Batch stream to compare on: `replay` (all tokens), `task` (response tokens) or
                `onpolicy` (the responses `OnlineReplay(sampler: trainable, prompts: task,
                stream: onpolicy)` samples from the current weights). Quote the key in YAML
                (`"on": task`): YAML 1.1 reads a bare `on` as true.
            direction: `forward` = KL(p_ref || p_theta), `reverse` = KL(p_theta || p_ref).
            beta: Generalised JSD interpolation in [0, 1] (TRL GKD convention); overrides
                `direction`, so leave that at `forward` when setting it. The term jumps at both
                ends: JSD_beta tends to 0 as beta -> 0 or 1 (M tends to one of the two
                distributions), but beta=0 and beta=1 are the forward and reverse KLs
                themselves (`token_divergence`).
            temperature: Both distributions are softened by this temperature.
            chunk_size: Target tokens per chunk of the divergence; None: sized by the vocabulary
                (`heads.LOGITS_PER_CHUNK` logits at once).
            teacher: A checkpoint (folder or hub name) with the model's tokenizer to compare
                with instead of the frozen base; None: the module's reference.
            top_k: Keep only the teacher's (or reference's) k most likely next tokens: the
                forward KL coarsened to them and the rest (`direction: forward`, no `beta`).
            name: Log key suffix; default `kl_to_reference`.
        """
        super().__init__(weight, name)
        if on not in (REPLAY, TASK, ONPOLICY):
            raise ValueError(f"KLToReference.on must be 'replay', 'task' or 'onpolicy', got {on!r}")
        if direction not in ("forward", "reverse"):
            raise ValueError(f"KLToReference.direction must be 'forward' or 'reverse', got {direction!r}")
        if beta is not None and not 0 <= beta <= 1:
            raise ValueError(f"KLToReference.beta must be in [0, 1] or None, got {beta}")
        if beta is not None and direction != "forward":
            raise ValueError("KLToReference: give either beta (generalised JSD) or direction, not both")
        if temperature <= 0:
            raise ValueError(f"KLToReference.temperature must be > 0, got {temperature}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"KLToReference.chunk_size must be >= 1 or None, got {chunk_size}")
        if top_k is not None and (top_k < 1 or beta is not None or direction != "forward"):
            raise ValueError("KLToReference.top_k must be >= 1 and comes with the forward KL (direction: forward, "
                             f"no beta); got top_k={top_k}, direction={direction!r}, beta={beta}")
        self.on, self.direction, self.beta = on, direction, beta
        self.temperature, self.chunk_size = temperature, chunk_size
        self.teacher, self.top_k = teacher, top_k
        self.needs_reference = teacher is None
        self.streams = (on,)
        self.reference = None
        self._placed, self._dtype = False, None

    def setup(self, module) -> None:
        vocab = module.hf_model.config.vocab_size
        if self.top_k is not None and self.top_k > vocab:
            raise ValueError(f"{self.name}: top_k={self.top_k} is more than the vocabulary's {vocab} tokens")
        self.reference = module.reference if self.teacher is None else self._load_teacher(module)
        self._placed = self.teacher is None  # the module places its own reference
        self._dtype = next(p.dtype for p in module.model.parameters() if p.is_floating_point())

    def _load_teacher(self, module) -> FrozenReference:
        """The teacher checkpoint, frozen; refused if its tokenizer is not the model's."""
        trust = module.hparams.trust_remote_code
        if tokenizer_fingerprint(load_tokenizer(self.teacher, trust)) != tokenizer_fingerprint(module.tokenizer):
            raise ValueError(f"{self.name}: teacher {self.teacher!r} has another tokenizer than the model being "
                             f"fine-tuned ({module.tokenizer.name_or_path!r}); a token-level KL needs the same one")
        teacher = FrozenReference(load_causal_lm(self.teacher, None, trust), "copy")
        if module.device_mesh is not None:
            teacher.shard(data_parallel_mesh(module.device_mesh))
        return teacher

    def __call__(self, batch: dict, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        b = batch[self.on]
        if not self._placed:  # a teacher: beside the trainable model, in its dtype
            self.reference.to(b["input_ids"].device, self._dtype)
            self._placed = True
        hidden = self.reference.hidden_states(b["input_ids"], b["attention_mask"])
        with self.reference.head_gathered():
            return self.divergence(outputs[self.on], hidden, b["labels"])

    def divergence(self, logits: Logits | torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean divergence over target positions, from trainable logits and reference hidden states.

        Args:
            logits: The trainable model's `Logits` (or (B, T, V) logits); position t predicts
                labels[:, t + 1].
            hidden: (B, T, H) reference hidden states; `self.reference.logits` maps them to logits.
            labels: (B, T) targets, IGNORE_INDEX where no loss is taken.
        """
        return chunked_target_mean(self._per_token, labels, logits, hidden, chunk_size=self.chunk_size,
                                   per=self.normalize)

    def _per_token(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ref_logits = self.reference.logits(hidden)  # (chunk, V), no grad
        if self.top_k is not None:
            logp = (ref_logits.float() / self.temperature).log_softmax(-1).topk(self.top_k, dim=-1)
            return topk_forward_kl(logits / self.temperature, logp.indices, logp.values)
        return token_divergence(logits, ref_logits, self.direction, self.beta, self.temperature)
