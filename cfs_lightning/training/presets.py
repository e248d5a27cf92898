"""Presets: `CausalLMFineTuner` subclasses that fix some of the regularizers (docs/methods.md shows
how to write one)."""

from __future__ import annotations

from .module import CausalLMFineTuner
from .regularizers import NLLReplay, Regularizer


class CFSFineTuner(CausalLMFineTuner):
    """Context-free replay preset: the task loss plus `replay_weight` x NLL on replay sequences.

    Equivalent to `CausalLMFineTuner` with `regularizers: [NLLReplay(weight=replay_weight)]`;
    further regularizers given in `regularizers` are added after it.
    """

    def __init__(self, pretrained: str, replay_weight: float = 1.0,
                 regularizers: list[Regularizer] | None = None, **kwargs) -> None:
        """
        Args:
            pretrained: Hub model name or local directory, loaded with `from_pretrained`.
            replay_weight: Weight of the replay NLL term.
            regularizers: Extra terms added after the replay NLL.
        """
        preset = [NLLReplay(weight=replay_weight)]
        super().__init__(pretrained, regularizers=preset + list(regularizers or []), **kwargs)
