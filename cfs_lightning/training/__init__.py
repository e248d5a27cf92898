"""Training: the LightningModule, its frozen reference, losses, LoRA, sharding and regularizers."""

from .module import CFSFineTuner, CausalLMFineTuner, NonFiniteLossError

__all__ = ["CFSFineTuner", "CausalLMFineTuner", "NonFiniteLossError"]
