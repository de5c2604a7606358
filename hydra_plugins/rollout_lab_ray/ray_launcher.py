"""Hydra launcher that runs each multirun job as a Ray task, a bounded number at a time.

    python -m rollout_lab -m engine.max_num_seqs=4,8     # or +sweep=<preset>
      -> one Ray task per point (hydra.launcher.max_parallel_jobs in flight, default 1)
      -> each task runs the job through Hydra's run_job; its vLLM and trainer actors join the
         same Ray cluster, so the job's actors and the sweep's tasks share one scheduler.

Why not hydra-ray-launcher 1.2.2: it pins cloudpickle<3 and pulls boto3 and ray[default], and
one failed job aborts the whole sweep. Here a failed job (an exception that escaped the run, or
a dead worker) is logged, written to <job dir>/failure.txt, and the sweep goes on; the analysis
reports it. Engine crashes are already results (summary.json status "crash"), not failures.
"""

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

FAILURE_FILE = "failure.txt"


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.rollout_lab_ray.ray_launcher.RayLauncher"
    # Jobs in flight at once. One fits a 2-core machine: a job's engine and trainer use every core.
    max_parallel_jobs: int = 1
    # The cluster to run on; null starts a local Ray (the jobs' own `ray.address` by default).
    address: Optional[str] = "${oc.select:ray.address,null}"


ConfigStore.instance().store(group="hydra/launcher", name="rollout_lab_ray", node=RayLauncherConf, provider="rollout_lab")


def _run_job(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction, singleton_state: Any) -> JobReturn:
    """Inside the Ray task: Hydra's own job runner, with the driver's Hydra state."""
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    try:
        return run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except SystemExit as exc:  # the entry point exits 2 on a bad config; that is this job's failure
        return JobReturn(overrides=list(sweep_config.hydra.overrides.task), status=JobStatus.FAILED, _return_value=exc)
    finally:
        # This worker exits after the job (max_calls=1); W&B's exit hook would then find its
        # service gone and print a traceback, so close the service while it is still there.
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()


def _cpus_per_job(config: DictConfig) -> float:
    """CPUs one rollout_lab job's actors declare (samplers + trainer)."""
    workers = OmegaConf.select(config, "loop.num_workers", default=1)
    sampler = OmegaConf.select(config, "ray.sampler_num_cpus", default=1.0)
    trainer = OmegaConf.select(config, "ray.trainer_num_cpus", default=1.0)
    return workers * sampler + trainer


class RayLauncher(Launcher):
    """Runs Hydra jobs as Ray tasks with at most `max_parallel_jobs` in flight."""

    def __init__(self, max_parallel_jobs: int = 1, address: Optional[str] = None) -> None:
        if max_parallel_jobs < 1:
            raise ValueError(f"hydra.launcher.max_parallel_jobs={max_parallel_jobs} must be >= 1")
        self.max_parallel_jobs = max_parallel_jobs
        self.address = address
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit every job, keeping at most max_parallel_jobs running; returns in job order."""
        import ray

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # W&B groups a sweep's runs under the sweep's name unless the user named a group.
        group = [] if OmegaConf.select(self.config, "logger.group") is not None else [f"logger.group={sweep_dir.name}"]

        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, [*overrides, *group])
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"ray_{idx}"
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
        self._init_ray(ray, max(_cpus_per_job(c) for c in configs))
        log.info(f"Ray launcher: {len(configs)} jobs, {self.max_parallel_jobs} at a time, sweep dir {sweep_dir}")

        # A fresh worker process per job (max_calls=1): nothing of one engine leaks into the next.
        # num_cpus=0: the job only drives; its actors declare the CPUs they use.
        remote_job = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(_run_job)
        returns: dict[int, JobReturn] = {}
        pending: dict[Any, tuple[int, DictConfig, float]] = {}
        queue = list(enumerate(configs))
        while queue or pending:
            while queue and len(pending) < self.max_parallel_jobs:
                i, sweep_config = queue.pop(0)
                log.info(f"\t#{sweep_config.hydra.job.num} : {' '.join(filter_overrides(job_overrides[i]))}")
                ref = remote_job.remote(self.hydra_context, sweep_config, self.task_function, Singleton.get_state())
                pending[ref] = (i, sweep_config, time.perf_counter())
            done, _ = ray.wait(list(pending), num_returns=1)
            i, sweep_config, started = pending.pop(done[0])
            returns[i] = self._collect(ray, done[0], sweep_config, job_overrides[i], time.perf_counter() - started)
        return [returns[i] for i in range(len(configs))]

    def _init_ray(self, ray, cpus_per_job: float) -> None:
        if ray.is_initialized():
            return
        if self.address is not None:
            ray.init(address=self.address, log_to_driver=True)
            return
        # The jobs' actors take turns on the cores, so declare enough logical CPUs for them all.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_per_job * self.max_parallel_jobs)),
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        )

    def _collect(self, ray, ref, sweep_config: DictConfig, overrides: Sequence[str], seconds: float) -> JobReturn:
        """The job's return; a failure is written to its dir and returned as a finished job."""
        num = sweep_config.hydra.job.num
        try:
            ret = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died (out of memory, killed)
            ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=exc)
        if ret.status == JobStatus.COMPLETED:
            log.info(f"\t#{num} finished in {seconds:.0f} s: {ret.return_value}")
            return ret
        error = ret._return_value
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / FAILURE_FILE).write_text(f"{type(error).__name__}: {error}\n")
        log.error(f"\t#{num} failed after {seconds:.0f} s ({type(error).__name__}: {error}); the sweep goes on")
        return JobReturn(
            overrides=list(overrides),
            cfg=ret.cfg,
            hydra_cfg=ret.hydra_cfg,
            working_dir=ret.working_dir,
            task_name=ret.task_name,
            status=JobStatus.COMPLETED,
            _return_value="failed",
        )
