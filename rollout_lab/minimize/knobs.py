"""The engine knobs a minimization walks back to vLLM's defaults: which vllm.LLM arguments each covers,
where each goes back to, and a case with some of them kept (reduce.py's knob pass; the reports' words).

    engine args -> deviating_knobs (off their targets) -> with_knobs(keep) -> engine args
"""
from __future__ import annotations

from dataclasses import replace

from rollout_lab.config import EngineConfig
from rollout_lab.minimize.standalone import Case

# Engine knobs walked back to their defaults, with the vllm.LLM arguments each one covers.
KNOB_ARGS = {
    "cache_size": ("kv_cache_memory_bytes", "gpu_memory_utilization"),
    "block_size": ("block_size",),
    "max_num_seqs": ("max_num_seqs",),
    "max_num_batched_tokens": ("max_num_batched_tokens",),
    "max_model_len": ("max_model_len",),
    "enable_prefix_caching": ("enable_prefix_caching",),
    "enable_chunked_prefill": ("enable_chunked_prefill",),
    "enforce_eager": ("enforce_eager",),
}


def knob_targets(on_gpu: bool) -> dict[str, dict]:
    """The arguments each knob goes back to; {} leaves them out, which is vLLM's default."""
    targets: dict[str, dict] = {knob: {} for knob in KNOB_ARGS}
    if not on_gpu:
        # vLLM's default gpu_memory_utilization=0.9 reserves 90% of host RAM on the CPU backend:
        # the lab's default stands in for it.
        targets["cache_size"] = {"gpu_memory_utilization": EngineConfig.gpu_memory_utilization}
        # vLLM's default (enforce_eager=False) compiles the model with inductor on the CPU
        # backend: ~145 s per engine start on 2 cores, beyond a repro's budget.
        targets["enforce_eager"] = {"enforce_eager": True}
    return targets


# Engine arguments the minimizer never changes: what the failure is measured with (the dtype its
# tolerance belongs to, the seed, raw logprobs, the stats that count preemptions).
FIXED_ARGS = ("dtype", "seed", "logprobs_mode", "disable_log_stats")


def knobs_of(engine_args: dict) -> dict[str, tuple[str, ...]]:
    """KNOB_ARGS, then one knob per other argument the case sets (engine.args, the hunt's
    kv_cache_dtype, compilation_config...), named by it and going back to vLLM's default."""
    grouped = {n for names in KNOB_ARGS.values() for n in names}
    return KNOB_ARGS | {n: (n,) for n in engine_args if n not in grouped and n not in FIXED_ARGS}


def knob_args(knob: str) -> tuple[str, ...]:
    """The vllm.LLM arguments a knob covers: KNOB_ARGS' group, else the argument of that name."""
    return KNOB_ARGS.get(knob, (knob,))


def deviating_knobs(engine_args: dict, targets: dict[str, dict]) -> list[str]:
    """The knobs whose arguments differ from their targets (an argument of its own: set at all)."""
    return [
        knob
        for knob, names in knobs_of(engine_args).items()
        if {n: engine_args[n] for n in names if n in engine_args} != targets.get(knob, {})
    ]


def with_knobs(engine_args: dict, keep: list[str], targets: dict[str, dict]) -> dict:
    """Engine arguments with every knob outside `keep` set back to its target."""
    args = dict(engine_args)
    for knob, names in knobs_of(engine_args).items():
        if knob not in keep:
            for name in names:
                args.pop(name, None)
            args |= targets.get(knob, {})
    return args


# The case's one knob that is no engine argument: where the free block queue starts (Case.block_pool_head),
# back to a fresh engine's order (None). Trials with and without it share one engine.
POOL_HEAD = "block_pool_head"


def case_knobs(case: Case, targets: dict[str, dict]) -> list[str]:
    """The case's knobs off their targets: the engine's (deviating_knobs), then block_pool_head when set."""
    return deviating_knobs(case.engine_args, targets) + ([POOL_HEAD] if case.block_pool_head is not None else [])


def with_case_knobs(case: Case, keep: list[str], targets: dict[str, dict]) -> Case:
    """The case with every knob outside `keep` back to its target (block_pool_head: to None)."""
    return replace(case, engine_args=with_knobs(case.engine_args, keep, targets),
                   block_pool_head=case.block_pool_head if POOL_HEAD in keep else None)


def knob_text(case: Case, knobs: list[str]) -> str:
    """'block_size=16, block_pool_head=0.8': the case's values of the arguments `knobs` cover."""
    values = {POOL_HEAD: case.block_pool_head, **case.engine_args}
    return ", ".join(f"{n}={values[n]}" for k in knobs for n in knob_args(k) if n in values)
