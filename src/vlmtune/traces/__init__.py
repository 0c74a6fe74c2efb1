"""Traces: run a policy against a task app, store every step, filter steps into datasets.

``store/`` (the SQLite trace store), ``policies.py`` (random, expert, an OpenAI-style
endpoint, a local model batched through the engine), ``collect.py`` (the episode loop
and its summary) and ``filter.py`` (traces -> SFT, preference or RL JSONL, every row
checked by the data layer's own loader).
"""
