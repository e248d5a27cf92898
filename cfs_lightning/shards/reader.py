"""Reading a shard directory: its files checked against the manifest, its rows against the tokenizer."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset, concatenate_datasets

from ..io import sha256_file
from .manifest import MANIFEST, ReplayIntegrityError, read_manifest


def check_rows(rows: Dataset, vocab_size: int, where: str) -> None:
    """Refuse rows a batch cannot be made of: a sequence with no target (under 2 tokens), a token
    id outside the vocabulary, labels that do not line up with the ids or leave nothing to learn."""
    table = rows.with_format(None).data
    ids = table.column("input_ids")
    lengths = pc.list_value_length(ids)
    if len(ids) and pc.min(lengths).as_py() < 2:
        bad = pc.index(pc.less(lengths, 2), True).as_py()
        raise ReplayIntegrityError(f"{where}: row {bad} has {lengths[bad].as_py()} token(s); every "
                                   "sequence needs at least 2 (a start token and a target)")
    _check_ids(pc.list_flatten(ids), vocab_size, where, "input_ids")
    if "labels" in table.column_names:
        labels = table.column("labels")
        if not pc.all(pc.equal(pc.list_value_length(labels), lengths)).as_py():
            raise ReplayIntegrityError(f"{where}: labels and input_ids differ in length in some row")
        flat = pc.list_flatten(labels)
        _check_ids(pc.filter(flat, pc.not_equal(flat, -100)), vocab_size, where, "labels")
        targets = [sum(1 for t in row[1:] if t != -100) for row in labels.to_pylist()]
        if 0 in targets:
            raise ReplayIntegrityError(f"{where}: row {targets.index(0)} has no label to learn "
                                       "(every label after the first token is -100)")


def _check_ids(values, vocab_size: int, where: str, column: str) -> None:
    if len(values) == 0:
        return
    low, high = pc.min_max(values).values()
    if low.as_py() < 0 or high.as_py() >= vocab_size:
        raise ReplayIntegrityError(
            f"{where}: {column} holds token id {low.as_py() if low.as_py() < 0 else high.as_py()}, "
            f"outside the tokenizer's vocabulary [0, {vocab_size}); the shards were made for another "
            "tokenizer: regenerate them"
        )


def verify_shards(replay_dir: str | Path, manifest: dict) -> list[Dataset]:
    """The shards a manifest lists, opened memory-mapped; refuse a directory whose files differ
    from it: a listed file missing, an unlisted one present, a checksum or row count that differs."""
    folder = Path(replay_dir)
    listed = {s["file"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in folder.glob("*.arrow") if p.name not in listed):
        raise ReplayIntegrityError(f"{folder / extra} is not listed in {folder / MANIFEST}; remove it "
                                   "or regenerate the directory")
    parts = []
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise ReplayIntegrityError(f"{path} is listed in {folder / MANIFEST} but missing; "
                                       "regenerate the directory")
        if sha256_file(path) != entry["sha256"]:
            raise ReplayIntegrityError(f"{path} does not match its sha256 in {folder / MANIFEST} (changed "
                                       "or truncated after it was written); regenerate the directory")
        parts.append(Dataset.from_file(str(path)))
        if parts[-1].num_rows != entry["num_sequences"]:
            raise ReplayIntegrityError(f"{path} holds {parts[-1].num_rows} sequences, {folder / MANIFEST} says "
                                       f"{entry['num_sequences']}; regenerate the directory")
    total = sum(s["num_sequences"] for s in manifest["shards"])
    if total != manifest["num_sequences"]:
        raise ReplayIntegrityError(f"{folder / MANIFEST} says num_sequences={manifest['num_sequences']} "
                                   f"but its shards hold {total}; regenerate the directory")
    return parts


def load_shards(replay_dir: str | Path) -> Dataset:
    """All shards of a replay directory as one memory-mapped dataset, checked against its manifest."""
    parts = verify_shards(replay_dir, read_manifest(replay_dir))
    if not parts:
        raise ValueError(f"replay directory {replay_dir} holds no sequences")
    return concatenate_datasets(parts).with_format("numpy")

