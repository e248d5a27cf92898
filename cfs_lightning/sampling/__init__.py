"""Sampling from the base model: the settings, the budget, and the samplers every replay source,
rewriter and online callback draws with.

Sampling from the start token alone, at temperature 1 with no top-k/top-p truncation, draws
sequences from the base model's own distribution p_base. The all-token NLL of the trainable model
on such sequences is then a Monte Carlo estimate of KL(p_base || p_theta) up to a constant (the
base model's entropy), which is what makes context-free replay an anchor to the old distribution
(arXiv 2505.13811). Any truncation or temperature != 1 biases that estimate; the knobs exist for
experiments, not for the default recipe.

- `config`: `SamplingConfig`, `Budget`, `GenerationError`;
- `processors`: the logits chain, ending in the inverse-CDF draw (`InverseCDFSampler`);
- `prompted`: one batched `generate` over prompts (`sample_continuations`), the one way to sample;
- `context_free`: the resumable, rank-shared stream of context-free batches (`sample_context_free`).
"""

from .config import Budget, GenerationError, SamplingConfig
from .context_free import fit_token_budget, sample_context_free
from .processors import InverseCDFSampler, TokenizerVocabulary, TopKRecorder, inverse_cdf, logits_processors
from .prompted import generation_config, sample_continuations, trim_at_stop, without_checkpoint_settings

__all__ = [
    "Budget",
    "GenerationError",
    "InverseCDFSampler",
    "SamplingConfig",
    "TokenizerVocabulary",
    "TopKRecorder",
    "fit_token_budget",
    "generation_config",
    "inverse_cdf",
    "logits_processors",
    "sample_context_free",
    "sample_continuations",
    "trim_at_stop",
    "without_checkpoint_settings",
]
