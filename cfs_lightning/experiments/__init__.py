"""Orchestration: running fits and commands in-process, studies, continual fine-tuning, WiSE-FT,
the toy model's initialisation and reports. The only layer that imports every other."""
