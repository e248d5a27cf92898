"""Loading a causal LM safely: weights from safetensors only (never a pickled `.bin`), and code
shipped with a checkpoint run only when the user sets `trust_remote_code`; and the base-model
arguments every data command shares (`BaseModelArgs`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


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


@dataclass
class BaseModelArgs:
    """The base model a data command samples from or scores with (`base:` in its YAML)."""

    model: str
    """Base model: hub name or local directory."""
    tokenizer: str | None = None
    """Tokenizer name or directory; default: `model`."""
    dtype: str | None = None
    """Weight dtype (`float32`, `bfloat16`, ...); default float32."""
    device: str = "auto"
    """`auto` (CUDA when available; `cfs generate` under torchrun: the process's own GPU), `cpu`,
    `cuda`, `cuda:1`, ..."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run."""

    def load(self, device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model (on `device`, default `self.device`) and its tokenizer."""
        tok = AutoTokenizer.from_pretrained(self.tokenizer or self.model, trust_remote_code=self.trust_remote_code)
        lm = load_causal_lm(self.model, self.dtype, self.trust_remote_code)
        device = device or self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return lm.to(device), tok
