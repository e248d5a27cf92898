"""Training: the LightningModule, its frozen reference, losses, LoRA, sharding and regularizers."""

from .module import CausalLMFineTuner
from .nonfinite import NonFiniteLossError
from .presets import CFSFineTuner

__all__ = ["CFSFineTuner", "CausalLMFineTuner", "NonFiniteLossError"]
