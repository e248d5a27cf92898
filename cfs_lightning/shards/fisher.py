"""A diagonal Fisher estimate of a base model, written beside the replay shards it was taken on:
a folder of `fisher.safetensors` (one float32 tensor per parameter, by name) and `fisher.json`
(where it came from: the model's and the shards' fingerprints, the sequences and tokens used,
the seed). `cfs fisher` writes one (`replay/fisher.py`); EWC reads it (`L2ToInit(fisher=...)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_dir, write_text

FISHER_FORMAT = "cfs_lightning.fisher/1"
TENSORS, RECORD = "fisher.safetensors", "fisher.json"


def write_fisher(out: str | Path, fisher: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """Write the folder `out` whole or not at all (`io.atomic_dir`)."""
    with atomic_dir(out) as tmp:
        save_file({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in fisher.items()},
                  str(tmp / TENSORS))
        write_text(tmp / RECORD, json.dumps({"format": FISHER_FORMAT, **record}, indent=2) + "\n")


def read_record(folder: str | Path) -> dict[str, Any]:
    """The provenance of a Fisher folder; refuses a folder that is not one."""
    path = Path(folder).expanduser() / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {RECORD}: it is not a Fisher estimate; write one with "
                                "`cfs fisher --base.model M --replay_dir D --output.dir F`")
    record = json.loads(path.read_text())
    if record.get("format") != FISHER_FORMAT:
        raise ValueError(f"{path} has format {record.get('format')!r}, not {FISHER_FORMAT!r}: estimate it "
                         "again with this version's `cfs fisher`")
    return record


def read_fisher(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The per-parameter Fisher tensors (float32, CPU) and their record."""
    record = read_record(folder)
    tensors = Path(folder).expanduser() / TENSORS
    if not tensors.is_file():
        raise FileNotFoundError(f"{folder} holds the record of a Fisher estimate but not its {TENSORS}: run "
                                f"the `cfs fisher` that made it again (its settings are in {RECORD})")
    return load_file(str(tensors)), record
