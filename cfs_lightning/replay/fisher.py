"""`cfs fisher`: the diagonal Fisher of a base model on its replay sequences, for EWC without the
original data (`L2ToInit(fisher=...)`)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .. import __version__
from ..loading import BaseModelArgs
from ..shards import load_shards, model_fingerprint, read_manifest, tokenizer_fingerprint
from ..shards.fisher import RECORD, TENSORS, read_record, write_fisher
from ..tokens import eval_mode

ESTIMATOR = ("true Fisher: at every position of a replay sequence a target is drawn from the model's own "
             "next-token distribution; per sequence, the squared gradient of the summed log-likelihood of "
             "those targets; summed over sequences and divided by the number of positions")


def estimate_fisher(model: PreTrainedModel, sequences: list[list[int]], seed: int = 0,
                    show: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """diag F = E_x sum_t E_{y ~ p(.|x_<t)} [(d log p(y | x_<t) / d theta)^2] / (positions per sequence).

    The targets are drawn from the model, not read from the sequences, so this is the Fisher of
    the model's own distribution (the true Fisher), whatever sampled the prefixes; the draws of
    different positions are independent given the prefix, so the squared gradient of their summed
    log-likelihood has the per-position squares as its expectation. Per position, F is the
    curvature of the KL(p_theta0 || p_theta) per token at theta0: 1/2 * sum_i F_i (theta_i -
    theta0_i)^2 approximates the replay KL there. Float32; dropout off.

    Returns:
        F per named trainable parameter (float32, on the model's device), and the positions used.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("cfs fisher: the model has no trainable parameter to estimate a Fisher for")
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    gen = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    positions = 0
    with eval_mode(model):
        for ids in tqdm(sequences, desc="Fisher", disable=not show):
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=gen.device)
            logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
            with torch.no_grad():
                y = torch.multinomial(logp.exp(), 1, generator=gen)  # (T-1, 1) the model's own draws
            model.zero_grad(set_to_none=True)
            logp.gather(-1, y).sum().backward()
            for name, p in params.items():
                sums[name].add_(p.grad.float().square())
            positions += len(ids) - 1
    model.zero_grad(set_to_none=True)
    if positions == 0:
        raise ValueError("cfs fisher: no replay sequence has two tokens or more")
    return {name: s.div_(positions) for name, s in sums.items()}, positions


@dataclass
class FisherOutput:
    """Where `cfs fisher` writes (`output:` in its YAML)."""

    dir: str
    """The folder to write (`fisher.safetensors`, `fisher.json`), beside the replay shards."""
    overwrite: bool = False
    """Replace an estimate made with other settings (else it is refused)."""


def fisher(base: BaseModelArgs, replay_dir: str, output: FisherOutput, sequences: int | None = None,
           seed: int = 0) -> dict:
    """`cfs fisher`: estimate the base model's diagonal Fisher on replay sequences (its own
    context-free samples: `cfs generate`) and write it, with its provenance, to `output_dir`.

    A rerun with the same model, shards, `sequences` and `seed` finds the estimate there and does
    nothing. Memory: one float32 copy of the model's parameters beside the model and its gradients.

    Args:
        base: The model to estimate it for (float32 unless `base.dtype` says otherwise).
        replay_dir: The replay shards whose sequences are the prefixes.
        output: The folder to write.
        sequences: Use the first n sequences; None: all.
        seed: Seed of the targets drawn from the model.
    """
    manifest = read_manifest(replay_dir)
    model, tok = base.load()
    shards = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()
    request = {"model_fingerprint": model_fingerprint(model), "replay_shards_sha256": shards,
               "replay_model_fingerprint": manifest.get("model_fingerprint"), "sequences_requested": sequences,
               "seed": seed}
    out = Path(output.dir)
    # a record without its tensors (a clone of a repository that keeps only the record) is estimated again
    if (out / RECORD).is_file() and (out / TENSORS).is_file() and not output.overwrite:
        record = read_record(out)
        if {k: record.get(k) for k in request} == request:
            print(f"{out}: a Fisher estimate with these settings is already there")
            return record
        raise FileExistsError(f"{out} holds a Fisher estimate made with other settings (another model, shards, "
                              "sequences or seed); choose another output.dir or pass output.overwrite=true")
    rows = load_shards(replay_dir)["input_ids"]
    rows = rows if sequences is None else rows[:sequences]
    started = time.perf_counter()
    values, positions = estimate_fisher(model, [list(map(int, r)) for r in rows], seed)
    record = {**request, "estimator": ESTIMATOR, "model": model.name_or_path, "model_dtype": str(model.dtype),
              "tokenizer_fingerprint": tokenizer_fingerprint(tok), "replay_dir": str(replay_dir),
              "replay_source": manifest["source"], "sequences": len(rows), "positions": positions,
              "parameters": sum(v.numel() for v in values.values()),
              "mean": float(sum(v.sum() for v in values.values()) / sum(v.numel() for v in values.values())),
              "max": float(max(v.max() for v in values.values())), "seconds": round(time.perf_counter() - started, 1),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "package_version": __version__,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    write_fisher(out, values, record)
    print(f"{out}: diagonal Fisher of {record['parameters']} parameters from {len(rows)} sequences "
          f"({positions} positions) in {record['seconds']} s")
    return record
