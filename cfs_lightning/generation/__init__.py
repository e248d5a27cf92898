"""Context-free replay generation: sample from the base model, write Arrow shards + manifest."""

from .generate import generate_replay
from ..tokens import resolve_start_token
from .sampler import Budget, GenerationError, SamplingConfig, sample_context_free
from .shards import (
    ReplayMismatchError,
    check_manifest,
    load_shards,
    model_fingerprint,
    read_manifest,
    tokenizer_fingerprint,
)

__all__ = [
    "Budget",
    "GenerationError",
    "ReplayMismatchError",
    "SamplingConfig",
    "check_manifest",
    "generate_replay",
    "load_shards",
    "model_fingerprint",
    "read_manifest",
    "resolve_start_token",
    "sample_context_free",
    "tokenizer_fingerprint",
]
