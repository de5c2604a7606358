"""Where every sampler rank and the trainer run, decided once at start from the config and the machine.

    RunConfig + visible GPUs and cores -> plan() -> Placement -> describe()           (printed at start)
                                                              -> bundles(), actor options (loop.py: one Ray placement group)
                                                              -> engine kwargs and env    (sampler.py: vLLM's own executor)

On GPUs each tensor-parallel rank of a sampler holds a GPU of its own (NCCL ranks of one engine on
one GPU do not work), one bundle of the job's placement group per GPU; with one rank, samplers may
share GPUs. A TP sampler's actor holds no GPU itself: vLLM's Ray executor, finding the actor inside
the placement group, starts one worker per rank on the bundles named by VLLM_RAY_BUNDLE_INDICES
(the pattern of OpenRLHF's vLLM engines). The trainer takes a GPU no rank uses (separate) or a share
of sampler 0's first GPU (shared). On CPU, vLLM's only multi-rank executor is its multiprocessing
one, and a sampler's ranks split the cores (VLLM_CPU_OMP_THREADS_BIND: vLLM's automatic binding
wants a NUMA node per rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rollout_lab.config import ConfigError, RunConfig

TRAINER_GPU = ("auto", "separate", "shared")


@dataclass(frozen=True)
class SamplerPlacement:
    """One sampler worker: its TP size and, per rank, its GPU or (on CPU) the cores it binds."""

    worker: int
    tp_size: int
    # Per rank: an index among the job's GPUs (its bundle in the placement group); empty on CPU.
    gpus: tuple[int, ...]
    # Per rank on CPU: the cores its OpenMP threads bind to ("0", "2-3"); empty on GPUs.
    cpu_cores: tuple[str, ...]
    # The share of its GPU each rank takes (Ray's num_gpus); 0 on CPU.
    gpu_share: float
    num_cpus: float
    # vLLM's distributed_executor_backend; None for one rank (vLLM's in-process "uni").
    executor: Optional[str]


    def engine_kwargs(self) -> dict:
        """The vllm.LLM keyword arguments this placement adds (the executor of a multi-rank engine)."""
        return {"distributed_executor_backend": self.executor} if self.executor else {}

    def engine_env(self) -> dict[str, str]:
        """Environment variables vLLM's executor reads for this sampler's ranks, set before it starts."""
        if self.executor == "mp":
            return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(self.cpu_cores)}
        if self.executor == "ray":
            # vLLM copies only VLLM_*, NCCL_*, HF_*... to its Ray workers; the float32 Triton setting must go too.
            return {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, self.gpus)), "VLLM_RAY_PER_WORKER_GPUS": f"{self.gpu_share:g}",
                    "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "TRITON_F32_DEFAULT"}
        return {}

    def actor_options(self, group) -> dict:
        """ray.remote options of this sampler's actor in the job's placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # A multi-rank sampler on GPUs holds none itself: vLLM's Ray workers hold its ranks' shares,
        # and must find the placement group from inside the actor (capture_child_tasks).
        gpus = self.gpu_share if self.executor != "ray" else 0.0
        strategy = PlacementGroupSchedulingStrategy(group, self.gpus[0] if self.gpus else 0,
                                                    placement_group_capture_child_tasks=self.executor == "ray")
        return dict(num_cpus=self.num_cpus, num_gpus=gpus, scheduling_strategy=strategy)


@dataclass(frozen=True)
class TrainerPlacement:
    gpu: Optional[int]
    gpu_share: float
    # True when it shares its GPU with sampler ranks.
    shared: bool
    num_cpus: float

    def actor_options(self, group) -> dict:
        """ray.remote options of the trainer's actor in the job's placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(group, self.gpu if self.gpu is not None else 0)
        return dict(num_cpus=self.num_cpus, num_gpus=self.gpu_share, scheduling_strategy=strategy)


@dataclass(frozen=True)
class Placement:
    """The whole job's placement: what describe() prints, what the placement group reserves."""

    num_gpus: int
    num_cores: int
    samplers: tuple[SamplerPlacement, ...]
    trainer: TrainerPlacement

    def bundles(self) -> list[dict[str, float]]:
        """The job's placement-group bundles: one per GPU used (bundle i is GPU i), or one on CPU.

        A bundle takes a whole GPU when the job spreads over several, so two bundles never land on
        one GPU; a job on one GPU reserves only the shares it uses, so several jobs can share it."""
        if self.num_gpus == 0:
            return [{"CPU": sum(s.num_cpus for s in self.samplers) + self.trainer.num_cpus}]
        used = sorted({g for s in self.samplers for g in s.gpus} | {self.trainer.gpu})
        bundles = []
        for gpu in used:
            share = sum(s.gpu_share for s in self.samplers for g in s.gpus if g == gpu)
            share += self.trainer.gpu_share if self.trainer.gpu == gpu else 0.0
            cpus = sum(s.num_cpus for s in self.samplers if s.gpus[0] == gpu)
            cpus += self.trainer.num_cpus if self.trainer.gpu == gpu else 0.0
            bundle = {"GPU": 1.0 if len(used) > 1 else round(share, 3)}
            bundles.append(bundle | ({"CPU": cpus} if cpus else {}))
        return bundles

    def describe(self) -> str:
        """What runs where, one line per actor: printed when the job starts."""
        where = f"{self.num_gpus} GPU{'s' if self.num_gpus != 1 else ''}" if self.num_gpus else f"CPU, {self.num_cores} cores"
        lines = [f"placement ({where}):"]
        for s in self.samplers:
            if s.gpus:
                ranks = ", ".join(f"rank {r} GPU {g}" for r, g in enumerate(s.gpus))
                share = f" ({s.gpu_share:g} of {'each' if s.tp_size > 1 else 'it'})" if s.gpu_share < 1 else ""
            else:
                ranks = ", ".join(f"rank {r} cores {c}" for r, c in enumerate(s.cpu_cores)) if s.cpu_cores else "CPU"
                share = ""
            executor = f", vLLM executor {s.executor}" if s.executor else ""
            lines.append(f"  sampler {s.worker}: TP {s.tp_size}: {ranks}{share}{executor}")
        t = self.trainer
        if t.gpu is None:
            lines.append("  trainer: CPU")
        else:
            lines.append(f"  trainer: GPU {t.gpu} ({'shared with sampler ranks, ' if t.shared else 'its own, '}{t.gpu_share:g} of it)")
        return "\n".join(lines)


def tp_size(cfg: RunConfig) -> int:
    """The samplers' tensor-parallel size: engine.args.tensor_parallel_size, else 1."""
    size = cfg.engine.args.get("tensor_parallel_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"engine.args.tensor_parallel_size={size!r} must be a positive integer")
    return size


def _cores_per_rank(tp: int, cores: int) -> tuple[str, ...]:
    """VLLM_CPU_OMP_THREADS_BIND's per-rank core lists: the cores split evenly among the ranks."""
    per = cores // tp
    return tuple(f"{r * per}" if per == 1 else f"{r * per}-{(r + 1) * per - 1}" for r in range(tp))


def _share(occupants: int) -> float:
    """An equal share of one GPU, rounded down so the shares never sum past the whole GPU."""
    return int(1000 / occupants) / 1000


def plan(cfg: RunConfig, num_gpus: int, num_cores: int) -> Placement:
    """The placement of cfg's samplers and trainer on a machine with num_gpus GPUs and num_cores
    cores; ConfigError (one line) when it cannot fit."""
    workers, tp, mode, ray_cfg = cfg.loop.num_workers, tp_size(cfg), cfg.ray.trainer_gpu, cfg.ray
    if mode not in TRAINER_GPU:
        raise ConfigError(f"ray.trainer_gpu={mode!r} is not valid; choose one of {', '.join(TRAINER_GPU)}")
    if "distributed_executor_backend" in cfg.engine.args:
        raise ConfigError("engine.args.distributed_executor_backend is rollout_lab's placement's to choose "
                          "(vLLM's Ray executor on GPUs, its multiprocessing one on CPU)")
    if num_gpus == 0:
        if tp > num_cores:
            raise ConfigError(f"engine.args.tensor_parallel_size={tp} needs a core per rank; the machine has {num_cores}")
        cores = _cores_per_rank(tp, num_cores) if tp > 1 else ()
        samplers = tuple(SamplerPlacement(i, tp, (), cores, 0.0, ray_cfg.sampler_num_cpus, "mp" if tp > 1 else None)
                         for i in range(workers))
        return Placement(0, num_cores, samplers, TrainerPlacement(None, 0.0, False, ray_cfg.trainer_num_cpus))

    ranks = workers * tp
    if tp > num_gpus:
        raise ConfigError(f"engine.args.tensor_parallel_size={tp} needs {tp} GPUs (one per rank); the machine has {num_gpus}")
    if tp > 1 and ranks > num_gpus:
        raise ConfigError(f"loop.num_workers={workers} samplers x engine.args.tensor_parallel_size={tp} need {ranks} GPUs "
                          f"(one per rank, ranks of two engines do not share one); the machine has {num_gpus}")
    separate = mode == "separate" or (mode == "auto" and ranks < num_gpus)
    if separate and ranks >= num_gpus:
        raise ConfigError(f"ray.trainer_gpu=separate needs a GPU no sampler rank uses: {ranks + 1} GPUs; the machine has {num_gpus}")
    rank_gpus = [tuple((i * tp + r) % num_gpus for r in range(tp)) for i in range(workers)]
    trainer_gpu = ranks if separate else 0
    occupants = {g: sum(gpus.count(g) for gpus in rank_gpus) + (g == trainer_gpu) for g in range(num_gpus)}
    # Every rank of a sampler takes the same share (vLLM's VLLM_RAY_PER_WORKER_GPUS is one number).
    shares = [ray_cfg.sampler_num_gpus if ray_cfg.sampler_num_gpus is not None else min(_share(occupants[g]) for g in gpus)
              for gpus in rank_gpus]
    trainer_share = ray_cfg.trainer_num_gpus if ray_cfg.trainer_num_gpus is not None else _share(occupants[trainer_gpu])
    for g in range(num_gpus):
        held = sum(share * gpus.count(g) for share, gpus in zip(shares, rank_gpus)) + (trainer_share if g == trainer_gpu else 0.0)
        if held > 1.0 + 1e-9:
            raise ConfigError(f"GPU {g} would hold {held:g} GPUs of actors (ray.sampler_num_gpus={shares[0]:g} per rank, "
                              f"ray.trainer_num_gpus={trainer_share:g}); lower them or use more GPUs")
    samplers = tuple(SamplerPlacement(i, tp, gpus, (), share, ray_cfg.sampler_num_cpus, "ray" if tp > 1 else None)
                     for i, (share, gpus) in enumerate(zip(shares, rank_gpus)))
    trainer = TrainerPlacement(trainer_gpu, trainer_share, not separate, ray_cfg.trainer_num_cpus)
    return Placement(num_gpus, num_cores, samplers, trainer)


def standalone(engine_args: dict, num_gpus: int, num_cores: int) -> tuple[dict, dict[str, str]]:
    """(extra vllm.LLM kwargs, environment) for a tensor-parallel engine started in this process,
    outside Ray (the minimizer's and localizer's replays): vLLM's multiprocessing executor, on CPU
    with the cores split among the ranks as the RL job splits them; nothing for one rank."""
    tp = int(engine_args.get("tensor_parallel_size") or 1)
    if tp == 1:
        return {}, {}
    # The replays hand plain functions (faults, capture) to every rank through collective_rpc.
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    if num_gpus == 0:
        if tp > num_cores:
            raise ConfigError(f"tensor_parallel_size={tp} needs a core per rank; the machine has {num_cores}")
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(_cores_per_rank(tp, num_cores))
    elif tp > num_gpus:
        raise ConfigError(f"tensor_parallel_size={tp} needs {tp} GPUs (one per rank); the machine has {num_gpus}")
    return {"distributed_executor_backend": "mp"}, env


def reserve(where: Placement, timeout_s: float = 120.0):
    """The job's Ray placement group, on one node and ready; ConfigError when the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(where.bundles(), strategy="STRICT_PACK")
    if not group.wait(timeout_s):
        remove_placement_group(group)
        raise ConfigError(f"Ray could not place the bundles {where.bundles()} on one node within {timeout_s:.0f} s "
                          f"(available: {ray.available_resources()})")
    return group
