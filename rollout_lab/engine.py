"""The engine layer the RL sampler, the minimizer, the hunt, the localizer and the invariance check
share, so what every engine needs (compat.py) is applied in one place:

    start (or validate without starting) -> install_fault (a planted one, if any)
        -> generate(prompts, sampling_params) -> SampledOutput per completion
        -> reset (back to a fresh engine's state) -> generate ...

The RL job's engine arguments live here too: engine_kwargs (RunConfig -> vllm.LLM keywords) and
check_engine_args (engine.args against the installed vLLM, run where the job starts its engines,
never when a run dir is read).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

from rollout_lab import compat
from rollout_lab.config import ConfigError, EngineConfig, RunConfig, closest


def start(**kwargs):
    """`vllm.LLM(**kwargs)`, with the config overrides the installed vLLM needs for this checkpoint, and
    for a tensor-parallel engine that no placement gave an executor (the minimizer's, localizer's,
    hunt's and invariance replays) vLLM's multiprocessing one (rollout_lab/placement.py)."""
    import torch
    from vllm import LLM

    from rollout_lab import placement

    if kwargs.get("dtype") == "float32":
        # vLLM's float32 attention on CUDA is Triton's (TRITON_ATTN), and Triton's tl.dot rounds float32
        # inputs to TF32 unless told otherwise: |sampler - trainer| ~2e-3 per token instead of ~6e-6
        # (H100), and the weight-sync check fails. Read when kernels compile, so set before the engine.
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    if "distributed_executor_backend" not in kwargs:
        extra, env = placement.standalone(kwargs, torch.cuda.device_count(), os.cpu_count() or 1)
        for name, value in env.items():
            os.environ.setdefault(name, value)
        kwargs.update(extra)
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


def sampling_params(seed: Optional[int], **knobs):
    """The vllm.SamplingParams of one request: its own seed (None: it draws from the engine's RNG) and
    the SamplingParams fields given; vLLM refuses a bad value with an error compat.is_rejection knows."""
    from vllm import SamplingParams

    return SamplingParams(seed=seed, **knobs)


@dataclass
class SampledOutput:
    """One completion of a finished request, as the engine returned it."""

    # The position of its request among the outputs it was read from, vLLM's id for that request,
    # and its index among the request's n completions.
    request: int
    request_id: str
    completion: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    # The sampled token's logprob at each position; empty when the request asked for no logprobs.
    logprobs: list[float]
    # Every logprob vLLM returned at each position (the sampled token's and the top-k asked for).
    top_logprobs: list[dict[int, float]]
    num_preemptions: Optional[int]  # None: unknown (compat.preemptions_of), never 0
    num_cached_tokens: int
    finish_reason: Optional[str]
    text: Optional[str]


def sampled_outputs(outputs) -> list[SampledOutput]:
    """Finished vLLM RequestOutputs as records: one per completion, in order."""
    records = []
    for request, out in enumerate(outputs):
        preemptions, cached = compat.preemptions_of(out), int(out.num_cached_tokens or 0)
        for index, c in enumerate(out.outputs):
            top = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in c.logprobs] if c.logprobs else []
            records.append(SampledOutput(request, str(out.request_id), index, list(out.prompt_token_ids), list(c.token_ids),
                                         [top[p][t] for p, t in enumerate(c.token_ids)] if top else [], top,
                                         preemptions, cached, c.finish_reason, c.text))
    return records


def generate(llm, prompts: list[list[int]], params: list) -> list[SampledOutput]:
    """Sample each prompt (token ids) with its SamplingParams in one generate call."""
    return sampled_outputs(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))


def prompt_logprobs(llm, token_ids: list[int]) -> list[float]:
    """The engine's logprob of each token of a fixed sequence given its prefix (positions 1..n-1), the
    sequence alone in a prefill (which never reads the prefix cache)."""
    out = llm.generate([{"prompt_token_ids": token_ids}], sampling_params(None, max_tokens=1, prompt_logprobs=0, temperature=0.0),
                       use_tqdm=False)[0]
    return [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], token_ids[1:], strict=True)]


def install_fault(llm, name: str, params: dict):
    """Plant the fault `name` of rollout_lab/faults.py in the engine's worker; what its install returned."""
    from rollout_lab import faults

    return llm.collective_rpc(faults.install, args=(name, dict(params)))[0]


# The model runner modules of vLLM 0.25 and 0.32 and their short labels: the worker picks one per
# engine (VLLM_USE_V2_MODEL_RUNNER and vLLM's per-model default), and the faults hook each differently.
RUNNER_LABELS = {
    "vllm.v1.worker.gpu_model_runner": "v1",
    "vllm.v1.worker.gpu.model_runner": "v2",
    "vllm.v1.worker.cpu_model_runner": "cpu",
    "vllm.v1.worker.cpu.model_runner": "cpu-v2",
}


def runner_label(module: str) -> Optional[str]:
    """v1, v2, cpu or cpu-v2 for a model runner class's module; None for a runner the lab does not know."""
    return RUNNER_LABELS.get(module)


@dataclass
class ExecutionFacts:
    """How an engine executes the model, as its rank-0 worker reports it (summary.json's environment)."""

    model_runner: str  # module.Class of the worker's model runner
    model_runner_label: Optional[str]  # runner_label of its module
    # Per KV-cache group, the attention backends vLLM picked (their get_name()); None: the runner has no attn_groups.
    attention_backends: Optional[list[list[str]]]


def execution_facts(llm) -> ExecutionFacts:
    """The engine's model runner and attention backends, read in its rank-0 worker."""
    module, name, backends = llm.collective_rpc(_execution_facts)[0]
    return ExecutionFacts(f"{module}.{name}", runner_label(module), backends)


# Run inside vLLM's worker through collective_rpc (an in-process engine core takes plain functions).
def _execution_facts(worker) -> tuple:
    """Plain values (module, class name, backends): they cross a multiprocessing engine's reply as they are."""
    runner = worker.model_runner
    groups = getattr(runner, "attn_groups", None)  # list[list[AttentionGroup]] in both runners of 0.25 and 0.32
    backends = None if groups is None else [list(dict.fromkeys(g.backend.get_name() for g in group)) for group in groups]
    return type(runner).__module__, type(runner).__qualname__, backends


def _fault_targets(worker) -> list:
    runner = worker.model_runner
    builders = [b for groups in runner.attn_groups for group in groups for b in group.metadata_builders]
    return [runner, runner.model, *builders]


def _shadowing(target) -> set[str]:
    """Instance attributes that shadow a method of the class: how faults.install wraps one."""
    return {name for name in vars(target) if callable(getattr(type(target), name, None))}


def _remember_clean(worker) -> None:
    worker.rollout_lab_clean = [(target, _shadowing(target)) for target in _fault_targets(worker)]


def _remove_fault(worker) -> None:
    """Drop the wrappers added since remember_clean, so the class methods run again."""
    for target, clean in worker.rollout_lab_clean:
        for name in _shadowing(target) - clean:
            delattr(target, name)


def _reseed(worker) -> None:
    """Seed the worker's RNG as a fresh engine does once it is warmed up (vLLM's own call)."""
    compat.set_random_seed(worker.model_config.seed)


def _zero_kv_cache(worker) -> None:
    """Zero the KV (and state) memory, as a fresh engine allocates it."""
    pending = list(worker.model_runner.kv_caches)
    while pending:
        item = pending.pop()
        if isinstance(item, (list, tuple)):
            pending.extend(item)
        else:
            item.zero_()


def remember_clean(llm) -> None:
    """Note what the fresh engine's runner, model and attention builders look like, for reset."""
    llm.collective_rpc(_remember_clean)


def reset(llm) -> None:
    """Put an engine whose requests all finished back to what a fresh one (a repro.py) sees: no planted
    fault's wrappers (remember_clean noted the fresh state), an empty prefix cache, block ids handed out
    from 1 in order again, zeroed KV memory (a stale read returns what a fresh engine's would), request
    ids from 0, and the RNG that requests without a seed sample from seeded again."""
    llm.collective_rpc(_remove_fault)
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine still holds KV blocks after its requests finished")
    pool = compat.block_pool(llm)
    # A fresh pool hands out block ids in increasing order; a used one in eviction order.
    compat.hand_out_blocks_in_order(pool, pool.blocks[1:])
    llm.request_counter.reset()
    llm.collective_rpc(_zero_kv_cache)
    # Requests without a seed draw from the engine's RNG: start it where a fresh engine's starts.
    llm.collective_rpc(_reseed)


def engine_kwargs(cfg: RunConfig, model_path: str) -> dict:
    """vllm.LLM keyword arguments for this run's engine config: the typed knobs, then engine.args."""
    e = cfg.engine
    kwargs = dict(
        model=model_path,
        dtype=e.dtype,
        max_model_len=e.max_model_len,
        max_num_seqs=e.max_num_seqs,
        enable_prefix_caching=e.enable_prefix_caching,
        enable_chunked_prefill=e.enable_chunked_prefill,
        enforce_eager=e.enforce_eager,
        seed=e.seed,
        logprobs_mode=e.logprobs_mode,
        disable_log_stats=False,
        worker_extension_cls="rollout_lab.weight_sync.WeightSyncExtension",
    )
    if e.record_schedule:
        kwargs["scheduler_cls"] = "rollout_lab.engine_hooks.RecordingScheduler"
    # Passed even with an explicit KV size: vLLM on CUDA still checks that this share of the GPU
    # is free at start (its default, 0.92, fails when several engines share one GPU).
    kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    if e.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = e.kv_cache_memory_bytes
    if e.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if e.block_size is not None:
        kwargs["block_size"] = e.block_size
    # Checked at start (check_engine_args): none of them is a key set above.
    kwargs |= e.args
    return kwargs


# vLLM arguments rollout_lab sets itself (engine_kwargs), and why engine.args cannot.
LAB_ENGINE_ARGS = {
    "model": "the model is model.name",
    "disable_log_stats": "rollout_lab keeps vLLM's stats on (preemption counts, cache use)",
    "worker_extension_cls": "rollout_lab's weight sync is the worker extension",
    "scheduler_cls": "rollout_lab's scheduling records are the scheduler (engine.record_schedule)",
}


@functools.cache
def vllm_engine_args() -> frozenset[str]:
    """The keyword arguments the installed vLLM's engine takes (EngineArgs' fields)."""
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def engine_arg_message(name: str) -> Optional[str]:
    """One line when engine.args.<name> is no EngineArgs keyword of the installed vLLM, or one that
    rollout_lab types (engine.<name>) or sets itself; None when it may be passed."""
    valid = vllm_engine_args()
    if name in LAB_ENGINE_ARGS:
        return f"engine.args.{name} is set by rollout_lab: {LAB_ENGINE_ARGS[name]}"
    if name in valid and name in {f.name for f in dataclasses.fields(EngineConfig)}:
        return f"engine.args.{name} duplicates a typed knob; use engine.{name}"
    if name not in valid:
        hint = closest(name, sorted(valid), "engine.args")
        if not hint.startswith("did you mean"):  # not all of EngineArgs' ~250 fields on one line
            hint = f"none of its {len(valid)} (vllm.engine.arg_utils.EngineArgs' fields) is close"
        return f"engine.args.{name} is not an engine argument of the installed vLLM; {hint}"
    return None


def check_engine_args(cfg: RunConfig) -> None:
    """engine.args against the installed vLLM: every name, then the whole engine configuration
    through vLLM's own config validation (EngineArgs.create_engine_config; no engine starts)."""
    if not cfg.engine.args:
        return
    from rollout_lab.models import resolve_model

    for name in cfg.engine.args:
        message = engine_arg_message(name)
        if message:
            raise ConfigError(message)
    model_path = resolve_model(cfg.model.name)
    kwargs = {k: v for k, v in engine_kwargs(cfg, model_path).items() if k != "model"}
    try:
        complaint = validate(model_path, kwargs)
    except Exception as exc:  # vLLM refuses some values by other errors (KeyError: an unknown enum name)
        complaint = f"{type(exc).__name__}: {exc}"
    if complaint:
        given = ", ".join(f"{k}={v}" for k, v in cfg.engine.args.items())
        # pydantic's "[type=..., input_value=...] For further information visit <url>" after each reason.
        reason = re.sub(r" \[type=[^\]]*\]( For further information visit \S+)?", "", " ".join(complaint.split()))
        raise ConfigError(f"engine.args ({given}): vLLM refuses this engine configuration: {reason[:400]}")
