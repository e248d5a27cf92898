"""The shard format shared by replay sources and task rewriters: manifest, reader, writer."""

from .manifest import (
    KINDS,
    Kind,
    MANIFEST,
    REPLAY_WAIVER,
    ReplayIntegrityError,
    ReplayMismatchError,
    check_manifest,
    check_model,
    model_fingerprint,
    provenance,
    read_manifest,
    require_kind,
    tokenizer_fingerprint,
)
from .reader import check_rows, load_shards, verify_shards
from .writer import ShardOutput, Stream, write_shards
from .merge import merge_shards

__all__ = [
    "KINDS",
    "MANIFEST",
    "REPLAY_WAIVER",
    "Kind",
    "ReplayIntegrityError",
    "ReplayMismatchError",
    "ShardOutput",
    "Stream",
    "check_manifest",
    "check_model",
    "check_rows",
    "load_shards",
    "merge_shards",
    "model_fingerprint",
    "provenance",
    "read_manifest",
    "require_kind",
    "tokenizer_fingerprint",
    "verify_shards",
    "write_shards",
]
