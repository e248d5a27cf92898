"""Task rewriters, each file one method and its `cfs` command: self-output and rephrase (verified
by `verifiers.py`, ranked by `scoring.py`) and selective token masking. Each writes a shard
directory of kind `task`, which replaces the task's training split (`data.task.shards`)."""
