"""The streams of a training batch: one name per kind of rows, defined here and nowhere else.

A training batch maps stream names to padded batches (`input_ids`, `attention_mask`, `labels`,
maybe cached top-k). The DataModule produces `task` and `replay`; a callback that samples during
the fit (`OnlineReplay`) produces `replay`, `onpolicy` and `onpolicy_teacher`; the task loss and
the regularizers read them.
"""

from __future__ import annotations

TASK = "task"
"""The task's examples (prompt and response; only the response tokens are targets)."""
REPLAY = "replay"
"""Replay sequences: cached shards (`cfs generate`, ...) or sampled online."""
ONPOLICY = "onpolicy"
"""The trainable model's own responses to task prompts, sampled during the fit."""
ONPOLICY_TEACHER = "onpolicy_teacher"
"""The teacher's view of each `onpolicy` row (its task example in context), row by row."""

STREAMS = (TASK, REPLAY, ONPOLICY, ONPOLICY_TEACHER)
