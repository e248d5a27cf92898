"""Write the fine-tuned model as a Hugging Face checkpoint at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..io import atomic_dir
from ..loading import transformers_bars_off


class HFExport(L.Callback):
    """`save_pretrained` of the trained model and its tokenizer when fit ends.

    With LoRA the directory holds the merged model and, under `adapter/`, the adapter alone.

    The directory is written beside itself and renamed into place when complete, so a crash never
    leaves a half-written checkpoint, and an existing export is replaced only by a finished one.
    """

    def __init__(self, dirpath: str | None = None, enabled: bool = True) -> None:
        """
        Args:
            dirpath: Output directory; default `<trainer.log_dir>/hf_model`.
            enabled: Set false to skip the export.
        """
        self.dirpath, self.enabled = dirpath, enabled
        self.last_path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        out = Path(self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model"))
        # Every rank calls save_pretrained: a sharded model is gathered collectively to rank 0.
        if trainer.is_global_zero:
            with atomic_dir(out) as tmp, transformers_bars_off():  # a bar per fit, for a local write
                pl_module.save_pretrained(tmp)
            rank_zero_info(f"Hugging Face checkpoint written to {out}")
        else:
            pl_module.save_pretrained(None)
        self.last_path = out
        trainer.strategy.barrier("hf_export")
