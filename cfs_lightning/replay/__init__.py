"""Replay sources, each file one source and its `cfs` command: context-free (`cfs generate`),
contextual, corpus (real text) and self-dialogue. Each writes a shard directory of kind `replay`."""
