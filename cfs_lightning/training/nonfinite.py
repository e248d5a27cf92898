"""What a NaN or infinite loss term does (`model.nonfinite`): `stop` saves `last.ckpt` (the weights
before the step) and raises an error naming the step, the term and its stream; `skip` drops the
batch (no update) and counts it in `train/skipped_nonfinite`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

NONFINITE = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """A loss term went NaN or infinite; the message names the step, the term and the stream."""


class NonFiniteGuard:
    """Checks a step's logged terms before its backward pass, on every rank alike."""

    def __init__(self, mode: str) -> None:
        if mode not in NONFINITE:
            raise ValueError(f"model.nonfinite must be 'stop' or 'skip', got {mode!r}")
        self.mode, self.skipped = mode, 0

    def skips(self, module: L.LightningModule, logs: dict[str, torch.Tensor],
              sources: dict[str, tuple[str, ...]], batch_idx: int) -> bool:
        """Whether this step is skipped for a NaN/Inf term (on any rank); `stop` raises instead.

        Args:
            module: The LightningModule (its trainer, to agree across ranks and to checkpoint).
            logs: Log key -> the term's value this step.
            sources: Log key -> the streams the term reads.
            batch_idx: The batch's index in its epoch.
        """
        bad = [key for key, value in logs.items() if not torch.isfinite(value.detach()).all()]
        if not module.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            return False
        if self.mode == "skip":
            self.skipped += 1
            module.log("train/skipped_nonfinite", float(self.skipped), reduce_fx="max")
            return True
        path = save_last_checkpoint(module.trainer)
        what = (", ".join(f"{k} is {logs[k].item()} on the {'/'.join(sources[k]) or 'no'} stream" for k in bad)
                if bad else "a term is non-finite on another rank")
        raise NonFiniteLossError(
            f"step {module.global_step} (epoch {module.current_epoch}, batch {batch_idx}): {what}. The "
            f"weights before this step are saved in {path}; resume with --ckpt_path={path}, or set "
            "model.nonfinite=skip to skip such batches (or lower the learning rate)"
        )


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """`last.ckpt` next to the run's checkpoints (every rank calls this)."""
    callback = trainer.checkpoint_callback
    folder = (Path(callback.dirpath) if callback is not None and callback.dirpath
              else Path(trainer.default_root_dir) / "checkpoints")
    path = folder / "last.ckpt"
    trainer.save_checkpoint(path)
    return path
