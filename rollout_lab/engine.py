"""Starting a vLLM engine: the one constructor the RL sampler, the minimizer, the hunt and the
invariance check call, so what every engine needs from compat.py is applied in one place."""
from __future__ import annotations

from rollout_lab import compat


def start(**kwargs):
    """`vllm.LLM(**kwargs)`, with the config overrides the installed vLLM needs for this checkpoint."""
    from vllm import LLM

    overrides = compat.hf_overrides(kwargs["model"])
    if overrides:
        kwargs["hf_overrides"] = {**overrides, **(kwargs.get("hf_overrides") or {})}
    return LLM(**kwargs)
