"""Training-side figures: step time per regularizer, model FLOP utilisation, the DataModule's
throughput and peak memory per way of holding the reference."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from harness import (FixedBatches, Setting, StepTimer, figure, free, interleaved, ratios, parameter_counts,
                     peak_memory, trainer)

from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.tasks import TaskSource
from cfs_lightning.training.lora import LoRA
from cfs_lightning.training.task_losses import DFT, NLL, TaskLoss
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.callbacks import OnlineReplay
from cfs_lightning.sampling import SamplingConfig
from cfs_lightning.training.regularizers import (EMA, KLFromCachedTopK, KLToReference, L2ToInit, NLLReplay,
                                                SelfDistillation)

ON_POLICY_EVERY = 4  # steps between samplings, as in configs/toy/methods/on-policy-kl.yaml and sdft.yaml


@dataclass(frozen=True)
class Arm:
    """One way of training: its regularizers, whether the batch carries cached replay, the task
    loss, whether the trainable model samples on-policy rows (with the teacher's view), a
    precision other than the run's, and whether the losses read whole (B, T, V) logits instead of
    the hidden states a chunk at a time (`CausalLMFineTuner.head_split` off)."""

    regularizers: Callable[[], list] = list
    replay: bool = False
    task_loss: Callable[[], TaskLoss | None] = NLL
    onpolicy: bool = False
    demonstrations: bool = False
    precision: str | None = None
    whole_logits: bool = False
    activation_checkpointing: bool = False


ARMS = {
    "plain FT": Arm(),
    "NLLReplay": Arm(lambda: [NLLReplay()], replay=True),
    "KLToReference": Arm(lambda: [KLToReference()], replay=True),
    "KLFromCachedTopK": Arm(lambda: [KLFromCachedTopK()], replay=True),
    "L2ToInit": Arm(lambda: [L2ToInit()]),
    "EMA": Arm(lambda: [EMA()]),
    "DFT": Arm(task_loss=DFT),
    "ASFT": Arm(lambda: [KLToReference(weight=0.1, on="task", direction="forward")], task_loss=DFT),
    "on-policy KL": Arm(lambda: [KLToReference(on="onpolicy", direction="reverse")], onpolicy=True),
    "SDFT": Arm(lambda: [SelfDistillation()], task_loss=lambda: None, onpolicy=True, demonstrations=True),
}
REAL_ARMS = {name: arm for name, arm in ARMS.items() if not arm.onpolicy} | {
    "plain FT, whole logits": Arm(whole_logits=True),
    "plain FT, 32-true": Arm(precision="32-true"),
    "plain FT, activation checkpointing": Arm(activation_checkpointing=True),
}
"""The arms run on real checkpoints: the on-policy ones are left out (sampling 256-token
responses inside the fit would dominate the run's time), the whole-logits step, float32 and activation checkpointing added."""
GSM8K = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "train.jsonl"


def fit_once(setting: Setting, model_dir: Path, regularizers: list, batch: dict, steps: int,
             lora: LoRA | None = None, task_loss: Callable[[], TaskLoss | None] = NLL, callbacks: tuple[L.Callback, ...] = (),
             warmup: int | None = None, arm: Arm | None = None, peaks: list | None = None) -> list[float]:
    """Seconds per training step of a fresh module, the first `warmup` (default: the setting's)
    left out. The timer runs first, so a step's time includes the callbacks' work at its start
    (on-policy sampling). With `setting.memory_every`, the fit's peak memory is appended to `peaks`."""
    arm, timer = arm or Arm(), StepTimer(setting)
    tracked = peak_memory(setting.device, setting.memory_every) if setting.memory_every else contextlib.nullcontext({})
    with tracked as result:  # the model's construction included, as TRL's arm counts it
        module = CausalLMFineTuner(str(model_dir), regularizers=regularizers, lora=lora, task_loss=task_loss(),
                                   activation_checkpointing=arm.activation_checkpointing)
        module.head_split = module.head_split and not arm.whole_logits
        trainer(setting, steps, [timer, *callbacks], arm.precision).fit(module, datamodule=FixedBatches(batch, steps))
        del module
    if setting.memory_every:
        peaks.append(result["bytes"])
    free()
    return timer.times[setting.warmup if warmup is None else warmup:]


def _round_up(steps: int) -> int:
    return -(-steps // ON_POLICY_EVERY) * ON_POLICY_EVERY


def on_policy_sampler(setting: Setting, demonstrations: bool) -> OnlineReplay:
    """On-policy rows as the toy configs draw them: every 4 steps the trainable model samples a
    response to each task prompt, a quarter of the task batch joining each step; responses run to
    the task rows' length (`task_batch`'s prompt is a quarter of the row)."""
    per_step = max(1, setting.batch_size // 4)
    pool = per_step * ON_POLICY_EVERY
    prompt = setting.seq_len // 4
    return OnlineReplay(every_n_steps=ON_POLICY_EVERY, num_sequences=pool, batch_size=per_step,
                        sampling=SamplingConfig(max_new_tokens=setting.seq_len - prompt, batch_size=pool, seed=0),
                        sampler="trainable", prompts="task", stream="onpolicy", demonstrations=demonstrations)


def step_times(setting: Setting, model_dir: Path, both: dict[str, dict],
               extra: dict[str, Callable[[int], float]], arms: dict[str, Arm] = ARMS,
               peaks: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Step time of each arm (and of `extra` ones), per repetition, the arms interleaved: the
    median over a fit's timed steps; for on-policy arms the mean over whole sampling rounds (warm-up
    and timed steps rounded up to rounds), so the sampling step's cost is spread over its round.
    With `setting.memory_every`, `peaks` gathers each arm's peak memory per repetition."""
    task_only = {"task": both["task"]}
    peaks = {} if peaks is None else peaks

    def arm(name: str):
        spec = arms[name]
        batch = both if spec.replay else task_only
        if not spec.onpolicy:
            steps = setting.warmup + setting.steps
            return lambda rep: statistics.median(
                fit_once(setting, model_dir, spec.regularizers(), batch, steps, task_loss=spec.task_loss,
                         arm=spec, peaks=peaks.setdefault(name, [])))
        warmup = _round_up(setting.warmup)
        return lambda rep: statistics.mean(fit_once(
            setting, model_dir, spec.regularizers(), batch, warmup + _round_up(setting.steps),
            task_loss=spec.task_loss, callbacks=(on_policy_sampler(setting, spec.demonstrations),), warmup=warmup))

    return interleaved({**{name: arm(name) for name in arms}, **extra}, setting.repeats)


def step_figures(setting: Setting, times: dict[str, list[float]]) -> list[dict]:
    """One ratio per arm against its baseline, for the arms this run has."""
    r = setting.replay_batch_size / setting.batch_size
    every = f"sampling every {ON_POLICY_EVERY} steps"
    rows = [  # figure, numerator, denominator, bound
        (f"NLLReplay (r={r:g}) / plain FT", "NLLReplay", "plain FT", 1.05 * (1 + r)),
        ("KLToReference (frozen copy) / plain FT", "KLToReference", "plain FT", 1.05 * (1 + r + r / 3)),
        ("KLFromCachedTopK / NLLReplay", "KLFromCachedTopK", "NLLReplay", 1.05),
        ("L2ToInit / plain FT", "L2ToInit", "plain FT", 1.03),
        ("EMA / plain FT", "EMA", "plain FT", 1.03),
        ("DFT task loss / plain FT", "DFT", "plain FT", 1.05),
        ("ASFT (DFT + task KL to a frozen copy) / plain FT", "ASFT", "plain FT", 1.05 * (1 + 1 / 3)),
        (f"on-policy KL ({every}) / plain FT", "on-policy KL", "plain FT", None),
        (f"SDFT ({every}) / plain FT", "SDFT", "plain FT", None),
        ("plain FT / plain FT with whole (B, T, V) logits", "plain FT", "plain FT, whole logits", 1.0),
        (f"plain FT, {setting.precision} / plain FT, 32-true", "plain FT", "plain FT, 32-true", None),
        ("plain FT with activation checkpointing / plain FT", "plain FT, activation checkpointing", "plain FT", None),
    ]
    return [figure(f"step time: {name}", ratios(times, num, den), bound, "<=")
            for name, num, den, bound in rows if num in times and den in times]


def matmul_peak(setting: Setting, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """Measured FLOP/s of a large square matmul: the device's practical peak for `dtype`."""
    n = n or (8192 if setting.device == "cuda" else 2048)
    a = torch.randn(n, n, device=setting.device, dtype=dtype)
    b = torch.randn(n, n, device=setting.device, dtype=dtype)
    a @ b
    rates = []
    for _ in range(reps):
        setting.sync()
        start = time.perf_counter()
        a @ b
        setting.sync()
        rates.append(2 * n**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def model_flops_per_step(model_dir: Path, setting: Setting) -> float:
    """Training FLOPs of one plain step: 6 x matmul parameters per token, plus attention scores
    (12 x layers x hidden x sequence length per token), the usual count (Chowdhery et al., 2022)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        _, matmul = parameter_counts(AutoModelForCausalLM.from_config(config))
    tokens = setting.batch_size * setting.seq_len
    return tokens * (6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * setting.seq_len)


def mfu_figure(setting: Setting, model_dir: Path, times: dict[str, list[float]]) -> tuple[dict, dict]:
    dtype = torch.bfloat16 if setting.precision.startswith("bf16") else torch.float32
    peak = matmul_peak(setting, dtype)
    achieved = model_flops_per_step(model_dir, setting) / statistics.median(times["plain FT"])
    mfu = achieved / peak
    name = f"model FLOP utilisation, full fine-tuning ({setting.precision})"
    target = 0.40 if setting.device == "cuda" and dtype == torch.bfloat16 else None
    return figure(name, mfu, target, ">="), {"peak_matmul_flops": peak, "achieved_flops": achieved,
                                               "matmul_dtype": str(dtype)}


def loader_figure(setting: Setting, model_dir: Path, replay_dir: Path, times: dict[str, list[float]]) -> tuple[dict, dict]:
    """The ReplayDataModule on the toy task (GSM8K) and generated replay, batches/s, against the
    NLLReplay step rate of the same batch sizes."""
    task = TaskSource(path="json", data_files={"train": str(GSM8K)}, split="train",
                      prompt="Question: {question}\nAnswer:", response=" {answer}", max_length=setting.seq_len)
    dm = ReplayDataModule(task, tokenizer=str(model_dir), batch_size=setting.batch_size,
                          replay_ratio=setting.replay_ratio, replay=ReplayConfig(dir=str(replay_dir), val_size=0,
                                                                                 strict=False))
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)  # a CombinedLoader knows its length only once iterated
    n = min(200, len(loader))
    rates = []
    for _ in range(setting.repeats):
        it = iter(loader)
        start = time.perf_counter()
        for _ in range(n):
            next(it)
        rates.append(n / (time.perf_counter() - start))
    steps_per_s = 1 / statistics.median(times["NLLReplay"])
    return figure("DataModule batches/s / NLLReplay training steps/s", [r / steps_per_s for r in rates], 50, ">="), {
        "loader_batches_per_s": statistics.median(rates), "train_steps_per_s": steps_per_s}


def memory_figures(setting: Setting, model_dir: Path, both: dict[str, dict]) -> tuple[list[dict], dict]:
    """Peak memory of a few training steps (model, optimizer state and activations included)."""
    arms = {
        "LoRA + NLLReplay": (lambda: [NLLReplay()], LoRA()),
        "LoRA + NLLReplay + KLToReference (adapters_disabled)": (lambda: [NLLReplay(), KLToReference()], LoRA()),
        "full FT + NLLReplay": (lambda: [NLLReplay()], None),
        "full FT + KLFromCachedTopK": (lambda: [KLFromCachedTopK()], None),
    }
    peaks = {}
    for name, (make, lora) in arms.items():
        with peak_memory(setting.device) as result:
            fit_once(setting, model_dir, make(), both, steps=3, lora=lora)
        peaks[name] = result["bytes"]
    figures = [
        figure("peak memory: LoRA + adapters-disabled reference / LoRA alone",
               peaks["LoRA + NLLReplay + KLToReference (adapters_disabled)"] / peaks["LoRA + NLLReplay"], 1.05, "<="),
        figure("peak memory: cached top-k KL / NLL replay",
               peaks["full FT + KLFromCachedTopK"] / peaks["full FT + NLLReplay"], 1.05, "<="),
    ]
    return figures, {f"peak bytes: {k}": v for k, v in peaks.items()}


def real_memory_figures(peaks: dict[str, list[int]], copy_bytes: int) -> list[dict]:
    """Peak memory figures from the timed fits (each arm's largest peak over its repetitions):
    the chunked losses against whole logits, what the frozen copy adds beyond its weights (KL
    against NLL replay, the same batch), and plain fine-tuning against TRL's SFTTrainer."""
    peak = {name: max(values) for name, values in peaks.items()}
    figures = [
        figure("peak memory: plain FT / plain FT with whole (B, T, V) logits",
               peak["plain FT"] / peak["plain FT, whole logits"], 0.5, "<="),
        figure("peak memory: plain FT with activation checkpointing / plain FT with whole logits",
               peak["plain FT, activation checkpointing"] / peak["plain FT, whole logits"], 0.5, "<="),
        figure("peak memory: (KLToReference - NLLReplay) / the frozen copy's weights",
               (peak["KLToReference"] - peak["NLLReplay"]) / copy_bytes, 1.1, "<="),
    ]
    if "TRL SFTTrainer" in peak:
        figures.append(figure("peak memory: plain FT with activation checkpointing / TRL SFTTrainer (its default "
                              "gradient checkpointing)", peak["plain FT, activation checkpointing"]
                              / peak["TRL SFTTrainer"], 1.0, "<="))
    return figures


def topk_replay(model: torch.nn.Module, replay_ids: torch.Tensor, k: int = 20) -> dict[str, torch.Tensor]:
    """A replay batch of the given rows with the base model's cached top-k, as the shards hold it."""
    with torch.no_grad():
        top = model(replay_ids.to(model.device)).logits.float().log_softmax(-1).topk(k, dim=-1)
    return {"input_ids": replay_ids, "attention_mask": torch.ones_like(replay_ids), "labels": replay_ids.clone(),
            "topk_ids": top.indices.cpu(), "topk_logprobs": top.values.cpu()}


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="cfs-bench-"))
