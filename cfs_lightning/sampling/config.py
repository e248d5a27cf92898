"""What a sampler is asked for: its settings (`SamplingConfig`) and how much (`Budget`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..tasks import TaskSource


class GenerationError(ValueError):
    """A sampling setting or budget cannot be honoured; the message names the setting to change."""


@dataclass
class SamplingConfig:
    """How replay sequences are drawn from the base model."""

    temperature: float = 1.0
    """Softmax temperature. 1.0 samples p_base itself, which the unbiased KL estimate needs."""
    top_p: float | None = None
    """Nucleus truncation; None disables it (the default: truncation biases the KL estimate)."""
    top_k: int | None = None
    """Top-k truncation; None disables it (the default: truncation biases the KL estimate)."""
    max_new_tokens: int = 256
    """Tokens generated after the start token, at most."""
    stop_at_eos: bool = True
    """Stop a sequence at its first stop token, kept as its last token: the tokenizer's EOS or any
    `eos_token_id` of the model's generation config (`cfs_lightning.tokens.stop_token_ids`).
    False: always max_new_tokens."""
    batch_size: int = 64
    """Sequences sampled in parallel per `generate` call (KV-cached). Larger batches sample more
    tokens per second (on 2 CPU cores, 0.37x a teacher-forced pass at 64, 0.73x at 256;
    benchmarks/RESULTS.md) at the cost of a larger KV cache."""
    seed: int = 0
    """Seed of the sampling stream. The same seed and settings give the same sequences."""
    start_token: str | None = None
    """Token every sequence starts from. None uses the tokenizer's BOS token; tokenizers without
    one (Qwen, OLMo) need it set, to their document separator (`<|endoftext|>`), not to a chat
    end-of-turn token such as Qwen's EOS `<|im_end|>`."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 or None, got {self.top_k}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise GenerationError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    """How much replay to generate: exactly one of the three fields."""

    sequences: int | None = None
    """A number of sequences."""
    tokens: int | None = None
    """A number of generated tokens (the start token not counted); the last sequence is cut so the
    total is exact."""
    fraction: float | None = None
    """A fraction of the task dataset's size, in sequences: 0.1 = one replay sequence for every
    ten task examples."""

    def __post_init__(self) -> None:
        given = [k for k in ("sequences", "tokens", "fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise GenerationError(
                f"budget needs exactly one of sequences, tokens, fraction; got {given or 'none'}"
            )
        value = getattr(self, given[0])
        if value <= 0:
            raise GenerationError(f"budget.{given[0]} must be > 0, got {value}")

    def task_size(self, task: TaskSource | None) -> int | None:
        """What `resolve` needs to know of the task: its training examples when the budget is a
        fraction of them (counted only then), else None."""
        return len(task.load(task.split)) if self.fraction is not None and task is not None else None

    def resolve(self, task_size: int | None = None) -> tuple[int | None, int | None]:
        """Return (max_sequences, max_tokens); exactly one is not None."""
        if self.fraction is None:
            return self.sequences, self.tokens
        if task_size is None:
            raise GenerationError(
                "budget.fraction needs the task dataset's size: give a `task` source next to the "
                "budget, or use budget.sequences / budget.tokens"
            )
        return max(1, math.floor(self.fraction * task_size + 0.5)), None
