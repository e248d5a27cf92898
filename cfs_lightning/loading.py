"""Loading a causal LM safely: weights from safetensors only (never a pickled `.bin`), code
shipped with a checkpoint run only when the user sets `trust_remote_code`, and GGUF files (the
llama.cpp format real checkpoints are often shipped in) accepted wherever a model is named; and
the base-model arguments every data command shares (`BaseModelArgs`).

A model source is a hub name, a local directory, or the path of a `.gguf` file. A GGUF file is
dequantized to float weights by transformers (the trained weights plus their 4-bit rounding) and
rebuilt as a plain model of the same config, so it trains, saves and exports like any other;
`cfs convert` writes such a model once as a safetensors folder, which then loads in seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging


def _source(name: str) -> tuple[str, dict]:
    """`from_pretrained`'s (name or directory, extra kwargs) for a model source: a `.gguf` path
    becomes its folder plus `gguf_file`; `~` is expanded in local paths."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF checkpoint {path} not found; give the path of a .gguf file "
                                    "(`cfs fetch` downloads the checkpoints cfs_lightning knows)")
        return str(path.parent), {"gguf_file": path.name}
    return (str(path) if path.exists() else name), {}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model source (hub name, directory or `.gguf` file)."""
    where, extra = _source(name)
    return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)


def load_causal_lm(name: str, dtype: str | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """`name` (hub name, local directory or `.gguf` file) in `dtype` (default float32), in eval
    mode as `from_pretrained` returns it."""
    if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    where, extra = _source(name)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    if extra:
        return _plain_from_gguf(where, extra["gguf_file"], torch_dtype)
    # A local folder loads in seconds and its bar would repeat on every fit; a hub model keeps
    # its bars, which show the download.
    quiet = transformers_bars_off() if Path(where).is_dir() else contextlib.nullcontext()
    try:
        with quiet:
            return AutoModelForCausalLM.from_pretrained(
                where, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise OSError(
            f"{name} has no safetensors weights; cfs_lightning does not unpickle `.bin` checkpoints "
            "(they can run arbitrary code). Convert it once with `from_pretrained(...)."
            "save_pretrained(dir)` in a trusted environment and load that directory"
        ) from err


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards"; also the hub's
    download bars) off for the block, for local work that takes seconds and repeats on every fit;
    put back on after, unless they were off already (HF_HUB_DISABLE_PROGRESS_BARS)."""
    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _plain_from_gguf(folder: str, gguf_file: str, dtype: torch.dtype) -> PreTrainedModel:
    """A GGUF checkpoint as a plain model: transformers loads it dequantized but marked as
    quantized (it then refuses `save_pretrained`), so its weights move into a model built from
    the same config without the quantization entry."""
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = str(Path(folder) / gguf_file)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(plain._tied_weights_keys or {}) if plain.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"GGUF checkpoint {folder}/{gguf_file}: its tensors do not fill a "
                         f"{type(plain).__name__} (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.eval()


@dataclass
class BaseModelArgs:
    """The base model a data command samples from or scores with (`base:` in its YAML)."""

    model: str
    """Base model: hub name, local directory or `.gguf` file."""
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
        tok = load_tokenizer(self.tokenizer or self.model, self.trust_remote_code)
        lm = load_causal_lm(self.model, self.dtype, self.trust_remote_code)
        device = device or self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return lm.to(device), tok
