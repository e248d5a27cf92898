"""The same plain fine-tuning step run by TRL's `SFTTrainer` (optional: `pip install -e .[bench]`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

from harness import Setting, free, peak_memory
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


class _StepTimer(TrainerCallback):
    """Seconds from `on_step_begin` (batch in hand) to `on_step_end` (after the optimizer step)."""

    def __init__(self, setting: Setting) -> None:
        self.setting, self.times, self._start = setting, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.setting.sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.setting.sync()
        self.times.append(time.perf_counter() - self._start)


def trl_step_time(setting: Setting, model_dir: Path, task: dict, out: Path, peaks: list | None = None) -> float:
    """Median step time of a fresh `SFTTrainer` on the rows of `task` (the plain FT batch): same
    model, batch size, sequence length, AdamW and precision, no gradient clipping (the Lightning
    arm clips none either), and SFTConfig's own default of gradient checkpointing; warm-up steps
    left out. With `setting.memory_every`, the peak memory
    of model construction and training is appended to `peaks`, as `training.fit_once` does."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    steps = setting.warmup + setting.steps
    rows = Dataset.from_dict({"input_ids": task["input_ids"].tolist(), "labels": task["labels"].tolist()})
    bf16 = setting.precision.startswith("bf16")
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=setting.batch_size, max_steps=steps,
        max_length=setting.seq_len, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.0, logging_strategy="no", save_strategy="no", report_to=[],
        bf16=bf16, use_cpu=setting.device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        packing=False, padding_free=False, dataset_num_proc=None,
    )
    timer = _StepTimer(setting)
    with peak_memory(setting.device, setting.memory_every) if setting.memory_every else contextlib.nullcontext() as result:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows,
                             processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])
        trainer.train()
        del trainer, model
    if setting.memory_every:
        peaks.append(result["bytes"])
    free()
    return statistics.median(timer.times[setting.warmup:])
