"""Starting a vLLM engine: the one constructor the RL sampler, the minimizer, the hunt and the
invariance check call, so what every engine needs from compat.py is applied in one place; and
vLLM's own validation of an engine configuration, without starting one."""
from __future__ import annotations

from typing import Optional

from rollout_lab import compat


def start(**kwargs):
    """`vllm.LLM(**kwargs)`, with the config overrides the installed vLLM needs for this checkpoint."""
    from vllm import LLM

    overrides = compat.hf_overrides(kwargs["model"])
    if overrides:
        kwargs["hf_overrides"] = {**overrides, **(kwargs.get("hf_overrides") or {})}
    return LLM(**kwargs)


def rejection_message(exc: BaseException) -> str:
    """vLLM's complaint on one line (pydantic puts the reason on the second)."""
    return " ".join(str(exc).split())[:300]


def validate(model_path: str, kwargs: dict) -> Optional[str]:
    """vLLM's own config validation of `vllm.LLM(model=model_path, **kwargs)` without starting an
    engine: the complaint, or None when it passes (None values are vLLM's defaults, left out).

    Cheap (vLLM's config objects only), so the hunt skips configurations vLLM would refuse without
    spending a process and a model load on them, and the RL job checks engine.args at start.
    Sizing checks that need the engine (is the KV cache big enough for max_model_len) still
    happen at start, except the one kv_cache_too_small makes.
    """
    from vllm.engine.arg_utils import EngineArgs

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        config = EngineArgs(model=model_path, **kwargs).create_engine_config()
    except Exception as exc:
        if compat.is_rejection(exc):
            return rejection_message(exc)
        raise
    return kv_cache_too_small(config, kwargs.get("kv_cache_memory_bytes"))


def kv_cache_too_small(config, kv_bytes: Optional[int]) -> Optional[str]:
    """For attention-only models: the check vLLM makes at start (can one max_model_len request fit?).

    KV bytes per token = 2 (K and V) x layers x KV heads x head size x dtype size, per block of
    block_size tokens, one block more for vLLM's null block. Hybrid models are left to the engine.
    """
    hf = config.model_config.hf_config
    if kv_bytes is None or any("mamba" in str(t) for t in (getattr(hf, "layer_types", None) or [])) \
            or "mamba" in hf.model_type or not getattr(hf, "num_key_value_heads", None):
        return None
    import torch

    model = config.model_config
    head = model.get_head_size()
    per_token = 2 * model.get_num_layers(config.parallel_config) * model.get_num_kv_heads(config.parallel_config) * head
    per_token *= torch.tensor([], dtype=model.dtype).element_size()
    block = config.cache_config.block_size or 16
    blocks = kv_bytes // (per_token * block)
    needed = -(-model.max_model_len // block) + 1
    if blocks < needed:
        return (f"kv_cache_memory_bytes={kv_bytes} holds {blocks} blocks of {block} tokens; one max_model_len="
                f"{model.max_model_len} request needs {needed} (checked before start, as vLLM does at start)")
    return None
