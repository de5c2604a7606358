"""Structured configs: the single source of truth for every knob (conf/ holds presets only).

The schema only, as torchtitan's job_config: the dataclasses, the values each knob may take
(validate) and their registration with Hydra. What builds on it lives elsewhere:
    presets.py      a pressure preset's per-model values merged into a composed config
    config_keys.py  every key a user types checked against the schema (Hydra's + opens the struct)
    engine.py       engine.args checked against the installed vLLM where an engine starts
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from rollout_lab.workload import REWARDS

DTYPES = ("float32", "bfloat16", "float16")
SEED_POLICIES = ("per_request", "engine")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the valid values."""


@dataclass
class ModelConfig:
    # An embedded model name (smollm2, or a seeded tiny model of rollout_lab.models: hybrid-tiny,
    # llama-tiny, ...), a local checkpoint directory, or a hub id.
    name: str = "smollm2"


@dataclass
class EngineConfig:
    device: str = "auto"
    dtype: str = "float32"
    # Exactly one of the two sizes the KV/state cache; kv_cache_memory_bytes wins when set.
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 512
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None
    block_size: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = True
    seed: int = 0
    # per_request: every sample gets its own seed derived from (seed, step, prompt, sample),
    # so a rollout is reproducible whatever else shares the batch. engine: one engine-wide RNG.
    seed_policy: str = "per_request"
    # raw_logprobs: logprobs of the model's own distribution, what the trainer recomputes.
    logprobs_mode: str = "raw_logprobs"
    # Record every scheduler step (requests, blocks, state slots, preemptions) through
    # rollout_lab's scheduler hook, joined onto the token table. Costs: scripts/bench_instrument.py.
    record_schedule: bool = True
    # vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, set in the sampler's process before
    # vLLM is imported): a request's logprobs do not depend on the batch. Promised on NVIDIA
    # compute capability >= 8.0 only; `python -m rollout_lab.invariance` checks the promise.
    batch_invariant: bool = False
    # Run the engine core inside the sampler actor's process (weight sync and our plugins need
    # no serialization); set true to use vLLM's separate engine-core process.
    multiprocessing: bool = False
    # Any other keyword of the installed vLLM's EngineArgs (+engine.args.kv_cache_dtype=fp8),
    # passed to vllm.LLM as given; checked at start against vLLM's fields and its config validation.
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkloadConfig:
    num_prompts: int = 8
    samples_per_prompt: int = 4
    max_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    prompt_seed: int = 0
    # Rotate through the prompt set step by step rather than reusing the same prompts.
    rotate_prompts: bool = True
    # How a completion is scored (rollout_lab/workload.py, REWARDS): math, the task's own; even_tokens,
    # a dense synthetic one for models that cannot do the task, so advantages and the policy move.
    reward: str = "math"


@dataclass
class TrainerConfig:
    device: str = "auto"
    dtype: str = "float32"
    learning_rate: float = 2e-5
    max_grad_norm: float = 1.0
    # Sequences per forward/backward chunk; bounds trainer memory, not the result.
    micro_batch_size: int = 16
    # vLLM's batch-invariant aten overrides (matmul, addmm, log_softmax, mean: Triton kernels,
    # CUDA only) in the trainer's process: the trainer-side half of bitwise on-policy RL, with
    # engine.batch_invariant. Attention stays transformers' own.
    batch_invariant: bool = False
    # CPU threads for torch. null: every core of the machine, since sampling and training take
    # turns (Ray would otherwise pin the actor to OMP_NUM_THREADS=num_cpus).
    num_threads: Optional[int] = None


@dataclass
class LoopConfig:
    steps: int = 3
    num_workers: int = 1
    # |sampler - trainer| above this flags a token. null: the calibrated value for the dtype, else
    # the default of rollout_lab/tolerances.py.
    spike_threshold: Optional[float] = None
    # After each weight sync, compare vLLM's and the trainer's logprobs on a fixed sequence.
    check_weight_sync: bool = True
    # null: the looser weight_sync tolerance of the engine's and the trainer's dtype (rollout_lab/tolerances.py).
    weight_sync_tolerance: Optional[float] = None


@dataclass
class RayConfig:
    # null starts a local Ray; "auto" joins the cluster this machine belongs to.
    address: Optional[str] = None
    sampler_num_cpus: float = 1.0
    trainer_num_cpus: float = 1.0
    # GPUs per sampler rank and for the trainer. null: rollout_lab/placement.py's share: a whole GPU
    # each where there are enough, else an equal share among the actors on a GPU.
    sampler_num_gpus: Optional[float] = None
    trainer_num_gpus: Optional[float] = None
    # The trainer's GPU: separate (one no sampler rank uses), shared (a share of sampler 0's first
    # GPU), or auto: separate when the machine has a GPU to spare. rollout_lab/placement.py plans it.
    trainer_gpu: str = "auto"


@dataclass
class LoggerConfig:
    # offline writes a W&B run dir that `wandb sync` can upload later; online needs a key.
    mode: str = "offline"
    project: str = "rollout_lab"
    entity: Optional[str] = None
    group: Optional[str] = None
    worst_tokens: int = 20


@dataclass
class FaultConfig:
    # A planted fault (rollout_lab/faults.py documents each and declares its parameters in
    # faults.PARAMS); null runs vLLM as shipped. A conf/fault/<name>.yaml preset sets every
    # parameter to its default (the fault_params group, register_fault_params).
    name: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)


def fault_params(name: str, params: dict) -> dict:
    """faults.PARAMS' defaults overlaid with the user's params; an unknown fault or key raises ConfigError."""
    from rollout_lab.faults import PARAMS  # here: faults.py imports torch, config.py stays light

    if name not in PARAMS:
        raise ConfigError(f"fault.name={name!r} is not valid; choose one of {', '.join(PARAMS)}")
    unknown = set(params) - set(PARAMS[name])
    if unknown:
        raise ConfigError(f"fault {name} has no parameter {', '.join(sorted(unknown))}; it takes {', '.join(PARAMS[name])}")
    for key, value in params.items():
        # Every parameter's default is a number: the value must be one too (an int stands for a float).
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"fault {name} parameter {key}={value!r} is not a number")
    return PARAMS[name] | dict(params)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    # Name of the +pressure preset in use (set by the preset), so the summary can say whether
    # the rare regime was reached.
    pressure: Optional[str] = None
    # A preset's values for one embedded model, used instead of its top-level ones when that
    # model runs (apply_pressure_by_model): what pressures a cache depends on the architecture.
    pressure_by_model: dict[str, Any] = field(default_factory=dict)
    # Where the engine's free block queue starts before each step's requests, as a fraction of its
    # blocks (a preset's knob, rollout_lab/pressure.py): requests get the top block ids and state
    # slots first. null: as vLLM leaves it (a fresh engine hands out the lowest ids first).
    block_pool_head: Optional[float] = None
    run_name: str = "run"
    # Where the run writes; Hydra sets it to its output dir.
    run_dir: Optional[str] = None


def _choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


def _positive(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive number")


def validate(cfg: RunConfig) -> RunConfig:
    """One line naming the key on any value no job can run with. engine.args are checked against the
    installed vLLM only where an engine starts (check_engine_args): a run dir from another release reads."""
    e, w, t, lp = cfg.engine, cfg.workload, cfg.trainer, cfg.loop
    _choice("engine.dtype", e.dtype, DTYPES)
    _choice("trainer.dtype", t.dtype, DTYPES)
    _choice("engine.device", e.device, DEVICES)
    _choice("trainer.device", t.device, DEVICES)
    _choice("engine.seed_policy", e.seed_policy, SEED_POLICIES)
    _choice("engine.logprobs_mode", e.logprobs_mode, LOGPROBS_MODES)
    _choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    _choice("workload.reward", w.reward, tuple(REWARDS))
    if not 0 < e.gpu_memory_utilization <= 1:
        raise ConfigError(f"engine.gpu_memory_utilization={e.gpu_memory_utilization} must lie in (0, 1]")
    for key, value in [
        ("engine.max_model_len", e.max_model_len),
        ("engine.max_num_seqs", e.max_num_seqs),
        ("workload.num_prompts", w.num_prompts),
        ("workload.samples_per_prompt", w.samples_per_prompt),
        ("workload.max_tokens", w.max_tokens),
        ("trainer.learning_rate", t.learning_rate),
        ("trainer.micro_batch_size", t.micro_batch_size),
        ("loop.steps", lp.steps),
        ("loop.num_workers", lp.num_workers),
    ]:
        _positive(key, value)
    for key, value in [
        ("engine.kv_cache_memory_bytes", e.kv_cache_memory_bytes),
        ("engine.max_num_batched_tokens", e.max_num_batched_tokens),
        ("engine.block_size", e.block_size),
        ("loop.spike_threshold", lp.spike_threshold),
        ("loop.weight_sync_tolerance", lp.weight_sync_tolerance),
    ]:
        _positive(key, value, allow_none=True)
    if cfg.fault.name is not None:
        fault_params(cfg.fault.name, cfg.fault.params)
    if cfg.block_pool_head is not None and (not 0 <= cfg.block_pool_head < 1 or e.multiprocessing):
        raise ConfigError(f"block_pool_head={cfg.block_pool_head} needs a fraction in [0, 1) and engine.multiprocessing=false "
                          "(it moves the block pool of an engine core in the sampler's own process)")
    if w.temperature < 0:
        raise ConfigError(f"workload.temperature={w.temperature} must be >= 0")
    if w.max_tokens >= e.max_model_len:
        raise ConfigError(
            f"workload.max_tokens={w.max_tokens} leaves no room for the prompt in "
            f"engine.max_model_len={e.max_model_len}"
        )
    if e.logprobs_mode == "processed_logprobs" and (w.temperature != 1.0 or w.top_p != 1.0 or w.top_k > 0):
        # The trainer recomputes the raw distribution; processed logprobs differ by design.
        raise ConfigError("engine.logprobs_mode=processed_logprobs needs temperature=1, top_p=1, top_k=-1")
    return cfg


def closest(name: str, valid: list[str], parent: str = "") -> str:
    """'did you mean a.x, a.y?' for the valid names nearest `name`, else the list of valid names."""
    where = f"{parent}." if parent else ""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(where + c for c in close)}?"
    return f"valid keys under {parent or 'the top level'}: {', '.join(valid)}"


def register() -> None:
    """Register the schema with Hydra so conf/config.yaml and overrides are type-checked."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    register_fault_params()


def register_fault_params() -> None:
    """faults.PARAMS as the config group fault_params: conf/fault/<name>.yaml takes its params from it."""
    from rollout_lab.faults import PARAMS

    for name, params in PARAMS.items():
        ConfigStore.instance().store(group="fault_params", name=name, node=dict(params))
