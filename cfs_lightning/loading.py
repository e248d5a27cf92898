"""Loading a causal LM safely: weights from safetensors only (never a pickled `.bin`), and code
shipped with a checkpoint run only when the user sets `trust_remote_code`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def load_causal_lm(name: str, dtype: str | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """`name` (hub name or local directory) in `dtype` (default float32), in train mode as
    loaded by `from_pretrained` (eval)."""
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    try:
        return AutoModelForCausalLM.from_pretrained(
            name, dtype=getattr(torch, dtype) if dtype else torch.float32,
            trust_remote_code=trust_remote_code, use_safetensors=True)
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise OSError(
            f"{name} has no safetensors weights; cfs_lightning does not unpickle `.bin` checkpoints "
            "(they can run arbitrary code). Convert it once with `from_pretrained(...)."
            "save_pretrained(dir)` in a trusted environment and load that directory"
        ) from err
