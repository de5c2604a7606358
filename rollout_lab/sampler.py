"""Sampler workers: a `vllm.LLM` per Ray actor, returning typed RolloutBatches."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rollout_lab import compat, engine, pressure, weight_sync
from rollout_lab.config import RunConfig, fault_params
from rollout_lab.crash import EngineCrash, crash_signature
from rollout_lab.instrument import SCHEDULE_LOG_ENV, ScheduleReader, join_schedule, peak_block_fraction, token_facts
from rollout_lab.placement import SamplerPlacement, tp_size
from rollout_lab.records import RolloutBatch, Sample, SampledRequest


@dataclass
class PromptRequest:
    """One prompt to sample `num_samples` completions for."""

    prompt_index: int
    token_ids: list[int]


def request_seed(base_seed: int, step: int, prompt_index: int, sample_index: int) -> int:
    """A per-request seed that depends only on the request's coordinates, not on batching."""
    seed = base_seed
    for part in (step, prompt_index, sample_index):
        seed = (seed * 1_000_003 + part + 1) % (2**31 - 1)
    return seed


def sampling_params(request: SampledRequest):
    """The vllm.SamplingParams a recorded request was sent with."""
    return engine.sampling_params(request.seed, n=request.n, max_tokens=request.max_tokens, temperature=request.temperature,
                                  top_p=request.top_p, top_k=request.top_k, logprobs=request.logprobs)


class SamplerWorker:
    """Owns one vLLM engine. Engine failures are raised as EngineCrash carrying a signature."""

    def __init__(self, cfg: RunConfig, worker_index: int, model_path: str, placement: Optional[SamplerPlacement] = None):
        """placement: where its ranks run (rollout_lab.placement); None: one engine as vLLM places it."""
        # Set before vLLM is imported: its env vars are read at import.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.engine.multiprocessing else "0"
        os.environ["VLLM_BATCH_INVARIANT"] = "1" if cfg.engine.batch_invariant else "0"
        if cfg.engine.multiprocessing:
            # faults.install crosses into the engine process as a pickled callable.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        for name, value in (placement.engine_env() if placement is not None else {}).items():
            os.environ.setdefault(name, value)
        self.schedule = None
        if cfg.engine.record_schedule:
            path = Path(cfg.run_dir or tempfile.mkdtemp(prefix="rollout_lab-")) / "schedule" / f"worker_{worker_index}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            os.environ[SCHEDULE_LOG_ENV] = str(path)
            self.schedule = ScheduleReader(path)
        self.fault = None
        self.cfg = cfg
        self.worker_index = worker_index
        self.tp_size = placement.tp_size if placement is not None else tp_size(cfg)
        self.start_crash = None
        self.start_seconds = 0.0
        self.execution: Optional[engine.ExecutionFacts] = None
        self.counters_before: dict[str, float] = {}
        started = time.perf_counter()
        try:
            self.llm = engine.start(**engine.engine_kwargs(cfg, model_path), **(placement.engine_kwargs() if placement is not None else {}))
            self.execution = engine.execution_facts(self.llm)
            if cfg.fault.name is not None:
                params = fault_params(cfg.fault.name, dict(cfg.fault.params))
                self.fault = engine.install_fault(self.llm, cfg.fault.name, params)
        except Exception as exc:  # an engine that cannot start is a result, not a traceback
            self.start_crash = crash_signature(exc, phase="engine_start")
        self.start_seconds = time.perf_counter() - started

    def ready(self) -> float:
        """Seconds the engine took to start; raises EngineCrash if it failed to start."""
        if self.start_crash is not None:
            raise EngineCrash(self.start_crash)
        self.counters_before = compat.engine_metrics(self.llm)
        return self.start_seconds

    def execution_facts(self) -> engine.ExecutionFacts:
        """The started engine's model runner and attention backends (read once, after it started)."""
        return self.execution

    def generate(self, step: int, prompts: list[PromptRequest]) -> RolloutBatch:
        """Sample every prompt `samples_per_prompt` times with per-token logprobs; the batch carries
        the requests as sent (an EngineCrash carries them too)."""
        w = self.cfg.workload
        per_request = self.cfg.engine.seed_policy == "per_request"
        requests = [
            SampledRequest(
                step=step,
                worker=self.worker_index,
                tp_size=self.tp_size,
                request_id=None,
                prompt_index=prompt.prompt_index,
                sample_index=sample_index,
                prompt_token_ids=list(prompt.token_ids),
                seed=request_seed(self.cfg.engine.seed, step, prompt.prompt_index, sample_index) if per_request else None,
                n=1,
                max_tokens=w.max_tokens,
                temperature=w.temperature,
                top_p=w.top_p,
                top_k=w.top_k,
                logprobs=0,
            )
            for prompt in prompts
            for sample_index in range(w.samples_per_prompt)
        ]
        # A preset's block_pool_head: this step's requests get the pool's top block ids first.
        pressure.move_pool_head(self.llm, self.cfg.block_pool_head)
        try:
            outputs = engine.generate(self.llm, [r.prompt_token_ids for r in requests], [sampling_params(r) for r in requests])
        except Exception as exc:
            raise EngineCrash(crash_signature(exc, phase="generate", step=step), requests) from None
        schedule = self.schedule.read_new() if self.schedule is not None else None
        ends = join_schedule(schedule) if schedule is not None else {}
        samples = []
        for request, out in zip(requests, outputs, strict=True):
            request.request_id = out.request_id
            samples.append(
                Sample(
                    prompt_index=request.prompt_index,
                    sample_index=request.sample_index,
                    request_id=out.request_id,
                    prompt_token_ids=out.prompt_token_ids,
                    token_ids=out.token_ids,
                    sampler_logprobs=out.logprobs,
                    num_cached_tokens=out.num_cached_tokens,
                    num_preemptions=out.num_preemptions,
                    finish_reason=out.finish_reason,
                    text=out.text,
                )
            )
            if schedule is not None:
                facts = token_facts(schedule, ends, out.request_id, len(out.prompt_token_ids), len(out.token_ids))
                samples[-1].kv_blocks, samples[-1].state_slots = facts.kv_blocks, facts.state_slots
                samples[-1].preemptions_before = facts.preemptions_before
        stats = self._step_stats()
        if schedule is not None and schedule.steps and schedule.num_blocks:
            stats["kv_blocks_peak_fraction"] = peak_block_fraction(schedule)
            stats["engine_steps"] = len(schedule.steps)
        return RolloutBatch(step=step, worker=self.worker_index, samples=samples, engine_stats=stats, requests=requests)

    def load_weights(self, encoded_weights: list) -> int:
        """Push new weights into the engine and drop prefix-cache entries computed with the old ones."""
        try:
            loaded = sum(self.llm.collective_rpc("rl_load_weights", args=(weight_sync.Shipment(encoded_weights),)))
        except Exception as exc:
            raise EngineCrash(crash_signature(exc, phase="weight_sync")) from None
        # Cached KV blocks hold activations of the old policy: reusing them would be a real bug.
        self.llm.reset_prefix_cache()
        return loaded

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """vLLM's logprob of each token of a fixed sequence given its prefix (positions 1..n-1)."""
        return engine.prompt_logprobs(self.llm, token_ids)

    def _step_stats(self) -> dict[str, float]:
        """Counter deltas since the last call (what this step did) and current gauges; a metric this
        vLLM does not report is left out (unknown), not 0."""
        now = compat.engine_metrics(self.llm)
        stats = {}
        for name in compat.COUNTER_METRICS.values():
            if name in now:
                stats[name] = now[name] - self.counters_before.get(name, 0.0)
        for name in compat.GAUGE_METRICS.values():
            if name in now:
                stats[name] = now[name]
        self.counters_before = now
        return stats
