"""Per-token scores of token sequences under a frozen model (one teacher-forced pass)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..tokens import eval_mode, pad_rows


@torch.no_grad()
def per_token_nll(model: PreTrainedModel, sequences: list[list[int]], pad_id: int,
                  batch_size: int = 16) -> list[list[float]]:
    """NLL (nats) of every token but the first given the tokens before it.

    Returns, per sequence of length n, a list of n - 1 values: entry t - 1 scores token t.
    Sequences are right-padded into batches of `batch_size`, so no padding sits before a token.
    """
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    with eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            rows = sequences[start: start + batch_size]
            ids, mask = (t.to(device) for t in pad_rows(rows, pad_id))  # (B, T), right-padded
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            scores += [nll[i, : len(row) - 1].tolist() for i, row in enumerate(rows)]
    return scores


def response_perplexity(nll: list[float], n_prompt: int) -> float:
    """exp(mean NLL) over the tokens after the first `n_prompt` (the response, given the prompt)."""
    response = nll[n_prompt - 1:]
    if not response:
        raise ValueError("a sequence has no token after its prompt to score")
    return math.exp(sum(response) / len(response))
