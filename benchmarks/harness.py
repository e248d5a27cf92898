"""What every benchmark section shares: the model built from config, fixed batches, timers,
interleaved repetitions and peak-memory tracking."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.experiments.init_model import train_tokenizer

SIZES = {
    # ~4M parameters: a training step takes about a tenth of a second on 2 CPU cores.
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2048),
    # The Llama-3.2-1B body (0.97B parameters without the embeddings); the vocabulary stays the
    # benchmark tokenizer's, so almost every FLOP is in the decoder blocks.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True),
}
SHAPES = {
    # The real checkpoints' shapes (their config.json), for random weights where they cannot be
    # fetched (the GPU check): the vocabulary is the real one, the tokenizer the benchmark's.
    "smollm2": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                              tie_word_embeddings=True, vocab_size=49_152)),
    "gemma3": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                   query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                                   tie_word_embeddings=True, vocab_size=262_144)),
}
TEXT = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare" / "train.txt"


@dataclass
class Setting:
    """The shapes and the device every section of one benchmark run uses."""

    device: str
    size: str
    batch_size: int
    replay_ratio: float
    seq_len: int
    repeats: int
    steps: int
    warmup: int
    precision: str
    memory_every: float | None = None
    """Real checkpoints: every timed fit also records its peak memory, sampled this often (s)."""

    @property
    def replay_batch_size(self) -> int:
        from cfs_lightning.data import replay_batch_size
        return replay_batch_size(self.replay_ratio, self.batch_size)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build_model_dir(out: Path, size: str, vocab_size: int = 2048, seed: int = 0) -> Path:
    """A model directory (random weights, BPE tokenizer trained on tinyshakespeare) of `size`: one
    of `SIZES`, or of `SHAPES` (whose head keeps the real vocabulary's width)."""
    tokenizer = train_tokenizer([str(TEXT)], vocab_size)
    model_type, shape = SHAPES[size] if size in SHAPES else ("llama", {"vocab_size": len(tokenizer), **SIZES[size]})
    config = AutoConfig.for_model(model_type, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **shape)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters that take part in matmuls: all but the input embedding)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return total, total - (0 if tied else embed.numel())


def task_batch(n: int, seq_len: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n random task rows of seq_len tokens; the first quarter is prompt (no label)."""
    ids = torch.randint(3, vocab, (n, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : seq_len // 4] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class FixedBatches(L.LightningDataModule):
    """The same batch every step: step timings then hold no data-loading time."""

    def __init__(self, batch: dict, steps: int) -> None:
        super().__init__()
        self.batch, self.steps = batch, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.steps, batch_size=None)


class StepTimer(L.Callback):
    """Seconds from the start of each training batch to its end (forward, backward, optimizer
    step and the regularizers' post-step hooks), synchronising the device at both ends."""

    def __init__(self, setting: Setting) -> None:
        self.setting, self.times, self._start = setting, [], 0.0

    def on_train_batch_start(self, *args) -> None:
        self.setting.sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.setting.sync()
        self.times.append(time.perf_counter() - self._start)


def trainer(setting: Setting, max_steps: int, callbacks: list[L.Callback], precision: str | None = None) -> L.Trainer:
    return L.Trainer(accelerator=setting.device, devices=1, max_steps=max_steps,
                     precision=precision or setting.precision,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     callbacks=callbacks)


def interleaved(arms: dict[str, Callable[[int], float]], repeats: int) -> dict[str, list[float]]:
    """Run every arm once per repetition, rotating their order, and collect each arm's values.

    Each arm takes the repetition index and returns one measurement. Rotating the order spreads
    slow phases of a noisy machine over all arms instead of one.
    """
    names, values = list(arms), {name: [] for name in arms}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            values[name].append(arms[name](rep))
    return values


def ratios(values: dict[str, list[float]], num: str, den: str) -> list[float]:
    """num/den per repetition, each pair measured in the same repetition."""
    return [a / b for a, b in zip(values[num], values[den], strict=True)]


def figure(name: str, values: float | list[float], bound: float | None, sense: str) -> dict:
    """One row of the results table: the median of `values` (one per repetition, or a single
    measurement), their range, and whether the median meets `bound` (None: no target)."""
    values = values if isinstance(values, list) else [values]
    value = statistics.median(values)
    ok = None if bound is None else (value <= bound if sense == "<=" else value >= bound)
    return {"figure": name, "value": value, "low": min(values), "high": max(values), "bound": bound,
            "sense": sense, "ok": ok}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return libc


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (small blocks plus mmapped large ones):
    glibc serves torch's CPU tensors from it. The resident set size would also count freed but
    cached pages, which is too noisy to compare peaks with. Called after every aten op while
    tracking a peak, so glibc is opened once."""
    info = _libc().mallinfo2()
    return info.uordblks + info.hblkhd


class _HeapPeak(TorchDispatchMode):
    """The peak of `heap_in_use()`, sampled after every aten operation."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, heap_in_use())
        return out


class _SampledHeapPeak:
    """The peak of `heap_in_use()`, sampled every `every` seconds by a thread: cheap enough to run
    inside timed steps of a large model, where a check after every aten op (`_HeapPeak`) would
    double the step time; a tensor that lives less than `every` can be missed."""

    def __init__(self, every: float) -> None:
        self.every, self.peak, self._stop = every, heap_in_use(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, heap_in_use())

    def __enter__(self) -> _SampledHeapPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, heap_in_use())


@contextlib.contextmanager
def peak_memory(device: str, every: float | None = None) -> Iterator[dict]:
    """Yields a dict whose `bytes` is, after the block, the peak memory in use during it minus the
    memory in use before it (CUDA: allocated bytes; CPU: malloc'd bytes, read after every aten op,
    or with `every` set, every `every` seconds: `_SampledHeapPeak`)."""
    free()
    result: dict = {}
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["bytes"] = torch.cuda.max_memory_allocated() - before
        return
    before = heap_in_use()
    with (_HeapPeak() if every is None else _SampledHeapPeak(every)) as tracker:
        yield result
    result["bytes"] = tracker.peak - before
