"""The hunt's config and its search space: every knob with its valid values, in one place.

A knob is a `vllm.LLM` keyword (hunt.space.engine) or a `SamplingParams` field
(hunt.space.sampling) with the list of values to try; null in a list means "leave it out" (vLLM's
default). To add a knob, add a line to conf/hunt/default.yaml; to add a workload generator, write
it in workloads.py and list its name there.

A point of the space is a flat dict: {"model": ..., "engine.<knob>": ..., } for an engine
configuration (a Group's engine), {"generator": ..., "sampling.<knob>": ..., "seed": ...} for a
workload (one trial).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from rollout_lab.config import ConfigError, FaultConfig, LoggerConfig, closest, register_fault_params
from rollout_lab.engine import vllm_engine_args
from rollout_lab.tolerances import TOLERANCES


@dataclass
class SpaceConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2", "hybrid-tiny", "mamba2-tiny"])
    # Memory-pressure presets (conf/pressure/<name>.yaml) tried as one more engine dimension: a
    # preset's engine knobs replace the drawn ones. null: no preset.
    pressure: list[Optional[str]] = field(default_factory=lambda: [None])
    engine: dict[str, Any] = field(default_factory=dict)
    # vLLM environment variables read when vLLM is imported (VLLM_BATCH_INVARIANT,
    # VLLM_USE_V2_MODEL_RUNNER, ...): set in the engine's own process, one more engine dimension.
    env: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    generators: list[str] = field(default_factory=list)


@dataclass
class OracleConfig:
    # |vLLM - transformers float32| logprob above this flags a token, per engine dtype (fp8_kv: an
    # fp8 KV cache, tolerances.oracle_row); default: rollout_lab/tolerances.py's spike_threshold, as in the RL loop.
    reference_tolerance: dict[str, float] = field(default_factory=lambda: {d: t.spike_threshold for d, t in TOLERANCES.items()})
    # |sampled logprob - the same request re-scored alone| (prompt_logprobs, no prefix-cache
    # reads, no batch), same engine; default: tolerances.py's metamorphic.
    metamorphic_tolerance: dict[str, float] = field(default_factory=lambda: {d: t.metamorphic for d, t in TOLERANCES.items()})
    # Seconds without progress before a trial counts as hung (engine start has its own limit).
    trial_timeout_s: float = 180.0
    engine_start_timeout_s: float = 300.0


@dataclass
class HuntConfig:
    # Wall seconds for the whole hunt (search and minimization); Ctrl-C stops it sooner.
    budget_s: float = 1800.0
    seed: int = 0
    # Workloads tried on one engine before the next engine configuration.
    workloads_per_engine: int = 12
    # Each engine's share of the machine: 1/parallel of its cores (torch threads, Ray CPUs) and of
    # its GPUs (Ray's num_gpus). Groups still run one at a time, so above 1 an engine only gets less.
    parallel: int = 1
    # Share of engine configurations drawn next to a failing one (one knob changed).
    exploit: float = 0.3
    # Random candidates scored for coverage per draw.
    candidates: int = 48
    # Minimize each new finding and verify its repro.py `verify_runs` times in fresh processes.
    minimize: bool = True
    verify_runs: int = 5
    # Folder of repros of bugs already found (relative to the repo; null: none): a crash with the
    # signature in one of its <name>/signature.txt (beside repro.py) is marked known, not minimized again.
    known_repros: Optional[str] = "repro"
    # Each minimization gets the hunt's remaining budget less the time its repro's verification
    # will take (verify_runs runs, one more with a planted fault, each `verify_run_s` seconds until
    # the hunt has timed one), but never less than this.
    minimize_floor_s: float = 300.0
    verify_run_s: float = 45.0
    # Stop after this many engine groups (null: until the budget is spent). For tests.
    max_groups: Optional[int] = None
    space: SpaceConfig = field(default_factory=SpaceConfig)
    oracles: OracleConfig = field(default_factory=OracleConfig)


@dataclass
class HuntRunConfig:
    hunt: HuntConfig = field(default_factory=HuntConfig)
    # A planted fault switched on in every engine (rollout_lab/faults.py); none by default.
    fault: FaultConfig = field(default_factory=FaultConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # The hunt dir; Hydra sets it. Running again on the same dir resumes.
    run_dir: Optional[str] = None


def register() -> None:
    ConfigStore.instance().store(name="hunt_schema", node=HuntRunConfig)
    register_fault_params()


@dataclass
class Space:
    """The knobs and their values, as lists; validated once."""

    models: list[str]
    engine: dict[str, list]
    sampling: dict[str, list]
    generators: list[str]
    pressure: list = field(default_factory=lambda: [None])
    env: dict[str, list] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: SpaceConfig, gpus: Optional[int] = None) -> "Space":
        """The space of cfg on a machine with `gpus` GPUs (None: the GPUs this process sees)."""
        from rollout_lab.hunt.workloads import GENERATORS

        engine = fit_gpus({k: list(v) for k, v in dict(cfg.engine).items()}, visible_gpus() if gpus is None else gpus)
        sampling = {k: list(v) for k, v in dict(cfg.sampling).items()}
        env = {k: [str(int(x)) if isinstance(x, bool) else str(x) for x in v] for k, v in dict(cfg.env).items()}
        for name in env:
            if not name.startswith("VLLM_"):
                raise ConfigError(f"hunt.space.env.{name}: only vLLM's own environment variables (VLLM_*) are knobs")
        for group, knobs in (("engine", engine), ("sampling", sampling), ("env", env)):
            empty = [k for k, values in knobs.items() if not values]
            if empty:
                raise ConfigError(f"hunt.space.{group}.{empty[0]} has no values")
        for group, knobs, valid in (("engine", engine, vllm_engine_args()), ("sampling", sampling, sampling_knobs())):
            for name in knobs:
                if name not in valid:
                    raise ConfigError(f"hunt.space.{group}.{name} is not a knob: {closest(name, sorted(valid), f'hunt.space.{group}')}")
        unknown = [g for g in cfg.generators if g not in GENERATORS]
        if unknown:
            raise ConfigError(f"hunt.space.generators: {unknown[0]!r} is not a generator; choose from {', '.join(GENERATORS)}")
        if not cfg.models or not cfg.generators:
            raise ConfigError("hunt.space needs at least one model and one generator")
        pressure = list(cfg.pressure) or [None]
        for name in pressure:
            if name is not None and not (PRESSURE_DIR / f"{name}.yaml").is_file():
                raise ConfigError(f"hunt.space.pressure: {name!r} is not a preset in {PRESSURE_DIR}")
        return cls(list(cfg.models), engine, sampling, list(cfg.generators), pressure, env)

    def engine_dims(self) -> dict[str, list]:
        """Dimensions of an engine point: the model, the pressure preset and every engine knob."""
        dims = {"model": self.models, **{f"engine.{k}": v for k, v in self.engine.items()},
                **{f"env.{k}": v for k, v in self.env.items()}}
        if self.pressure != [None]:
            dims["pressure"] = self.pressure
        return dims

    def workload_dims(self) -> dict[str, list]:
        """Dimensions of a workload point (besides its seed)."""
        return {"generator": self.generators, **{f"sampling.{k}": v for k, v in self.sampling.items()}}

    def dims(self) -> dict[str, list]:
        return self.engine_dims() | self.workload_dims()


# Engine knobs that need two or more GPUs: kept, with the tensor-parallel sizes that fit, only where
# the machine has them; elsewhere the engine runs at vLLM's default (one rank).
MULTI_GPU_KNOBS = ("tensor_parallel_size", "disable_custom_all_reduce")


def fit_gpus(engine: dict[str, list], gpus: int) -> dict[str, list]:
    """The engine knobs a machine with `gpus` GPUs can run: no multi-GPU knob below two GPUs, and no
    tensor_parallel_size above the GPU count."""
    if gpus < 2:
        return {k: v for k, v in engine.items() if k not in MULTI_GPU_KNOBS}
    if "tensor_parallel_size" in engine:
        engine = engine | {"tensor_parallel_size": [v for v in engine["tensor_parallel_size"] if v is None or v <= gpus]}
    return engine


def visible_gpus() -> int:
    """The CUDA devices this process sees (0 on a CPU machine)."""
    import torch

    return torch.cuda.device_count()


def sampling_knobs() -> set[str]:
    """The hunt's sampling knobs: SamplingParams' fields, plus per_request_seed (runner.py)."""
    from vllm import SamplingParams

    # A msgspec struct in the releases we run (no __dict__); vars() for a plain class.
    fields = getattr(SamplingParams, "__struct_fields__", None) or vars(SamplingParams())
    return set(fields) | {"per_request_seed"}


def engine_args(point: dict) -> dict:
    """vllm.LLM keyword arguments of an engine point (null values left out: vLLM's default)."""
    return {k.removeprefix("engine."): v for k, v in point.items() if k.startswith("engine.") and v is not None}


def engine_env(point: dict) -> dict[str, str]:
    """The vLLM environment variables of an engine point (set before vLLM is imported)."""
    return {k.removeprefix("env."): str(v) for k, v in point.items() if k.startswith("env.") and v is not None}


def sampling_args(point: dict) -> dict:
    """The sampling knobs of a workload point (null values left out)."""
    return {k.removeprefix("sampling."): v for k, v in point.items() if k.startswith("sampling.") and v is not None}


def point_key(*points: dict) -> str:
    """A short, stable hash of one or more points: a group's or a trial's identity."""
    payload = json.dumps([sorted(p.items()) for p in points], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


PRESSURE_DIR = Path(__file__).resolve().parents[2] / "conf" / "pressure"


def with_pressure(engine: dict) -> dict:
    """The engine point with its pressure preset's engine knobs in place of the drawn ones, and the
    preset's block_pool_head (where the block pool's free queue starts each trial) if it has one."""
    name = engine.get("pressure")
    if name is None:
        return engine
    from omegaconf import OmegaConf

    from rollout_lab.presets import model_pressure

    preset = OmegaConf.to_container(OmegaConf.load(PRESSURE_DIR / f"{name}.yaml"))
    per_model = model_pressure(preset, engine.get("model"))
    knobs = preset.get("engine", {}) | per_model.get("engine", {})
    head = per_model.get("block_pool_head", preset.get("block_pool_head"))
    point = {k: v for k, v in engine.items() if k != "block_pool_head"} | {f"engine.{k}": v for k, v in knobs.items()}
    return point if head is None else point | {"block_pool_head": head}
