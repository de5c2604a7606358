"""The RL loop: sample on vLLM workers, score, recompute logprobs, update, sync weights.

    prompts -> SamplerWorker.generate (Ray) -> RolloutBatch -> reward -> GRPO advantages
            -> Trainer.update (teacher-forced logprobs + one step) -> token table (Parquet)
            -> metrics (W&B, jsonl) -> SamplerWorker.load_weights -> weight-sync probe check
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from rollout_lab import oracles
from rollout_lab.analysis.outcome import outcome_class
from rollout_lab.config import RunConfig, validate
from rollout_lab.engine import check_engine_args
from rollout_lab.crash import CrashSignature, EngineCrash, crash_signature
from rollout_lab.mismatch import group_advantages, token_metrics, weight_sync_exercised
from rollout_lab.placement import plan, reserve
from rollout_lab.records import RolloutBatch, RunResult, token_table, write_config, write_requests, write_step, write_summary
from rollout_lab.sampler import PromptRequest
from rollout_lab.shift import shift_of_run
from rollout_lab.tolerances import device_name, engine_version, threshold_for
from rollout_lab.wandb_log import RunLogger
from rollout_lab.workload import REWARDS, encode_prompt, make_problems

# A fixed sequence whose logprobs vLLM and the trainer must agree on after every weight sync.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 7 = 19, and 6 * 7 = 42."


def _init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address is not None:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    # Samplers and the trainer take turns, so a small machine may host more actors than cores.
    needed = cfg.loop.num_workers * cfg.ray.sampler_num_cpus + cfg.ray.trainer_num_cpus
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(np.ceil(needed))),
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def _worst_rows(table, tokenizer, batches_by_key, k: int) -> list[dict]:
    """The k tokens with the largest |difference|, with the text just before them."""
    if k <= 0 or table.num_rows == 0:
        return []
    abs_diff = table.column("abs_diff").to_numpy()
    rows = []
    for i in np.argsort(-abs_diff)[:k]:
        row = {name: table.column(name)[int(i)].as_py() for name in
               ("step", "worker", "request_id", "position", "token_id", "sampler_logprob", "trainer_logprob", "abs_diff")}
        sample = batches_by_key[(row["worker"], row["request_id"])]
        context_ids = (sample.prompt_token_ids + sample.token_ids[: row["position"]])[-24:]
        row["context"] = tokenizer.decode(context_ids)
        row["token"] = tokenizer.decode([row["token_id"]])
        rows.append(row)
    return rows


def run(cfg: RunConfig) -> RunResult:
    """Run the RL loop described by cfg; an engine crash ends it with status 'crash'."""
    import ray

    job = setup(cfg)
    try:
        job.start_engines()
        for step in tqdm(range(cfg.loop.steps), desc="rl steps", unit="step"):
            timer = _PhaseTimer()
            metrics, table, samples = rl_step(job, step, timer)
            sync_weights(job, step, metrics, timer)
            job.log_step(step, metrics | timer.seconds, table, samples)
            check_sync(job, step, metrics)
        job.result.status = "ok"
    except EngineCrash as crash:
        job.result.status, job.result.crash = "crash", crash.signature
    except ray.exceptions.RayError as exc:
        job.result.status, job.result.crash = "crash", _ray_crash(exc)
    except WeightSyncError as exc:
        job.result.status, job.result.crash = "sync_mismatch", crash_signature(exc, phase="weight_sync")
    finally:
        finish(job)
    return job.result


@dataclass
class Job:
    """One RL run's parts (setup builds them) and what its steps have gathered so far."""

    cfg: RunConfig
    run_dir: Path
    result: RunResult
    tokenizer: Any
    problems: list
    prompt_ids: list[list[int]]
    probe_ids: list[int]
    samplers: list
    trainer: Any
    group: Any  # the Ray placement group the actors run in
    logger: RunLogger
    sync_tolerance: float
    started: float
    initial_probe: Optional[np.ndarray] = None
    all_diffs: list = field(default_factory=list)
    all_rewards: list = field(default_factory=list)
    policy_changes: list[float] = field(default_factory=list)

    def start_engines(self) -> None:
        """Wait for every sampler's engine; the trainer's probe logprobs before any update."""
        import ray

        self.result.engine_start_seconds = ray.get([s.ready.remote() for s in self.samplers])
        # Which model runner and attention backends ran: worker 0's (the samplers share one engine config).
        self.result.environment |= asdict(ray.get(self.samplers[0].execution_facts.remote()))
        if self.cfg.loop.check_weight_sync:
            self.initial_probe = np.asarray(ray.get(self.trainer.sequence_logprobs.remote(self.probe_ids)))

    def log_step(self, step: int, metrics: dict, table: pa.Table, samples: list) -> None:
        """The step's metrics and worst tokens to W&B and metrics.jsonl; the run's totals."""
        abs_diff = table.column("abs_diff").to_numpy()
        by_key = {(b.worker, s.request_id): s for b, s in samples}
        self.logger.log_step(step, metrics, abs_diff, _worst_rows(table, self.tokenizer, by_key, self.cfg.logger.worst_tokens))
        self.all_diffs.append(abs_diff)
        self.result.preemptions = add_preemptions(self.result.preemptions, metrics)
        self.result.steps_completed = step + 1


def setup(cfg: RunConfig) -> Job:
    """Check the config, make the run dir, prompts and probe; start Ray, the samplers and the trainer."""
    import ray
    from transformers import AutoTokenizer

    from rollout_lab.models import resolve_model
    from rollout_lab.sampler import SamplerWorker
    from rollout_lab.trainer import Trainer

    validate(cfg)
    check_engine_args(cfg)
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y-%m-%d/%H-%M-%S')}-{cfg.run_name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    run_id = f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    threshold, threshold_source = threshold_for(cfg)
    result = RunResult(run_id=run_id, run_dir=str(run_dir), spike_threshold=threshold, spike_threshold_source=threshold_source)
    result.environment = environment()
    config_dict = write_config(run_dir, cfg)

    model_path = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    w = cfg.workload
    problems = make_problems(max(w.num_prompts * (cfg.loop.steps if w.rotate_prompts else 1), 1), w.prompt_seed)

    _init_ray(cfg)
    placement = plan(cfg, int(ray.cluster_resources().get("GPU", 0)), os.cpu_count() or 1)
    print(placement.describe(), flush=True)
    group = reserve(placement)
    samplers = [
        ray.remote(SamplerWorker).options(**s.actor_options(group)).remote(cfg, s.worker, model_path, s)
        for s in placement.samplers
    ]
    trainer = ray.remote(Trainer).options(**placement.trainer.actor_options(group)).remote(
        model_path, cfg.trainer, cfg.engine.seed
    )
    return Job(cfg, run_dir, result, tokenizer, problems, [encode_prompt(tokenizer, p) for p in problems],
               tokenizer(PROBE_TEXT)["input_ids"], samplers, trainer, group, RunLogger(cfg, run_dir, run_id, config_dict),
               oracles.get("weight_sync").bound(cfg), started)


def rl_step(job: Job, step: int, timer: "_PhaseTimer") -> tuple[dict, pa.Table, list]:
    """Sample the step's prompts, score them, update the trainer and record every token; the step's
    metrics, its token table and its (batch, sample) pairs."""
    import ray

    cfg, w, result = job.cfg, job.cfg.workload, job.result
    offset = step * w.num_prompts if w.rotate_prompts else 0
    requests = [PromptRequest(offset + i, job.prompt_ids[offset + i]) for i in range(w.num_prompts)]
    try:
        batches: list[RolloutBatch] = ray.get(
            [s.generate.remote(step, chunk) for s, chunk in zip(job.samplers, _split(requests, len(job.samplers)))]
        )
    except EngineCrash as crash:
        # The failing engine's requests: what the minimizer replays (ray.get gives the first failure only).
        write_requests(job.run_dir, step, crash.requests)
        raise
    write_requests(job.run_dir, step, [r for b in batches for r in b.requests])
    samples = [(b, s) for b in batches for s in b.samples]
    rewards = [REWARDS[w.reward](s.text, s.token_ids, job.problems[s.prompt_index]) for _, s in samples]
    sequences = [(s.prompt_token_ids, s.token_ids) for _, s in samples]
    timer.lap("sample")
    advantages = group_advantages(np.array(rewards), np.array([s.prompt_index for _, s in samples]))
    result.zero_advantage_steps += int(not np.any(advantages))
    trainer_logprobs, train_stats = ray.get(job.trainer.update.remote(sequences, advantages))
    timer.lap("train")

    tables, start = [], 0
    for batch in batches:
        n = len(batch.samples)
        tables.append(token_table(result.run_id, batch, trainer_logprobs[start : start + n], rewards[start : start + n]))
        start += n
    table = pa.concat_tables(tables)
    write_step(job.run_dir, step, table)
    job.all_rewards += rewards

    sequence_id = np.array([f"{r}/{q}" for r, q in zip(table.column("worker").to_numpy(), table.column("request_id").to_pylist())])
    metrics = token_metrics(
        table.column("sampler_logprob").to_numpy(), table.column("trainer_logprob").to_numpy(), sequence_id, result.spike_threshold
    )
    metrics["reward_mean"] = float(np.mean(rewards))
    metrics |= engine_metrics(batches)
    metrics |= {f"train/{k}": v for k, v in train_stats.items()}
    return metrics, table, samples


def sync_weights(job: Job, step: int, metrics: dict, timer: "_PhaseTimer") -> None:
    """Ship the trainer's weights to every sampler; then, if checked, score the probe on both sides
    (sync/max_abs_diff: vLLM against the trainer; sync/policy_change: the trainer against its start)."""
    import ray

    weights = job.trainer.named_weights.remote(job.cfg.engine.dtype)
    ray.get([s.load_weights.remote(weights) for s in job.samplers])
    timer.lap("weight_sync")
    if job.cfg.loop.check_weight_sync:
        trainer_probe = np.asarray(ray.get(job.trainer.sequence_logprobs.remote(job.probe_ids)))
        sampler_probes = ray.get([s.prompt_logprobs.remote(job.probe_ids) for s in job.samplers])
        sync_diff = max(float(np.max(np.abs(np.asarray(p) - trainer_probe))) for p in sampler_probes)
        metrics["sync/max_abs_diff"] = sync_diff
        metrics["sync/policy_change"] = float(np.max(np.abs(trainer_probe - job.initial_probe)))
        result = job.result
        result.weight_sync_max_diff = max(result.weight_sync_max_diff or 0.0, sync_diff)
        result.policy_change = metrics["sync/policy_change"]
        job.policy_changes.append(result.policy_change)
        result.weight_sync_exercised = weight_sync_exercised(job.policy_changes, job.sync_tolerance)
    timer.lap("sync_check")


def check_sync(job: Job, step: int, metrics: dict) -> None:
    """WeightSyncError when vLLM's probe logprobs after the step's sync are off the trainer's by more than the
    bound: the dtype's weight-sync tolerance, or the engine's own disagreement on the step's sampled tokens if larger."""
    if not job.cfg.loop.check_weight_sync:
        return
    # The probe is scored by the same engine as the step's tokens, which it sampled with weights already checked:
    # a probe no further off than those tokens shows the engine's own error (a bug below the spike threshold is
    # the shift test's to judge), not weights that failed to arrive (docs/shift.md, "The weight-sync check").
    bound = max(job.sync_tolerance, metrics.get("abs_diff_max", 0.0))
    if not oracles.get("weight_sync").synced(metrics["sync/max_abs_diff"], bound):
        raise WeightSyncError(f"after step {step} vLLM and trainer disagree by {metrics['sync/max_abs_diff']:.3g} > {bound:.3g} "
                              f"(the larger of the weight-sync tolerance {job.sync_tolerance} and the step's largest token difference)")


def finish(job: Job) -> None:
    """The run's totals into its RunResult; summary.json and W&B's summary; the actors and their placement group gone."""
    import ray

    result = job.result
    diffs = np.concatenate(job.all_diffs) if job.all_diffs else np.zeros(0)
    result.num_tokens = int(diffs.size)
    if diffs.size:
        result.abs_diff_max, result.abs_diff_mean = float(diffs.max()), float(diffs.mean())
        result.spike_fraction = float(np.mean(diffs > result.spike_threshold))
        result.bitwise_equal_fraction = float(np.mean(diffs == 0.0))
        # A sync mismatch's sampled tokens are evidence too (its outcome stays sync mismatch).
        if result.status in ("ok", "sync_mismatch"):
            result.shift = shift_of_run(job.run_dir, job.cfg)
    if result.status != "interrupted":
        shifted = result.shift is not None and result.shift.shifted
        result.outcome = outcome_class(result.status, int(np.sum(diffs > result.spike_threshold)), False, shifted)
    result.reward_mean = float(np.mean(job.all_rewards)) if job.all_rewards else 0.0
    result.seconds = time.perf_counter() - job.started
    summary = {k: v for k, v in asdict(result).items() if k not in ("crash", "shift")}
    result.wandb_dir = job.logger.finish(summary | {"crash_key": result.crash.key if result.crash is not None else None}, result.shift)
    write_summary(job.run_dir, result)
    for actor in job.samplers + [job.trainer]:
        ray.kill(actor)
    ray.util.remove_placement_group(job.group)


def engine_metrics(batches: list[RolloutBatch]) -> dict[str, float]:
    """The step's engine stats (engine/<name>), summed over the workers; a stat some worker did not
    report is unknown for the step, so it is left out rather than summed as 0."""
    names = set.intersection(*(set(b.engine_stats) for b in batches))
    return {f"engine/{name}": float(sum(b.engine_stats[name] for b in batches)) for name in sorted(names)}


def add_preemptions(total: Optional[float], metrics: dict[str, float]) -> Optional[float]:
    """The run's preemption count after a step with these metrics; None while vLLM reported none."""
    if "engine/preemptions" not in metrics:
        return total
    return (total or 0.0) + metrics["engine/preemptions"]


class _PhaseTimer:
    """Wall seconds per phase of a step, reported as time/<phase> metrics."""

    def __init__(self):
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[f"time/{phase}"] = now - self.last
        self.last = now


class WeightSyncError(RuntimeError):
    """vLLM's logprobs after a weight sync do not match the trainer's: the sync is broken."""


def _ray_crash(exc: Exception) -> CrashSignature:
    """Signature of a Ray-level failure: the engine's EngineCrash if it got through, else the actor's death."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EngineCrash):
        return cause.signature
    return crash_signature(cause if isinstance(cause, BaseException) else exc, phase="actor")


def environment() -> dict[str, str]:
    """Versions and device a run was measured with (recorded in summary.json)."""
    import platform

    import torch
    import transformers

    return {
        "engine": engine_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device_name(),
    }
