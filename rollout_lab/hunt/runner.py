"""One engine group, run in its own process: start one vllm.LLM, run each workload as a trial, judge it.

    GroupSpec -> engine start (rejected / crash / ok) -> for each workload: reset the engine to a
    fresh one's state, plant the fault if any, drive the trace (trace.py), apply the oracles -> one
    JSON line per event in the group's lines file

The driver (supervise.py) runs this as a Ray task (a crash, hang or OOM kills one process, never the
hunt) and reads the lines file as it grows; each line is a protocol.TrialEvent. A heartbeat line
every 10 s carries the engine's step count (and the reference's batches): a trial that makes no
progress for the trial timeout is a hang (a slow one is not). After a crash the engine is in no
known state: the group stops there, and the driver runs the rest of its workloads on a fresh
engine of the same configuration. Once the hunt's deadline has passed no trial is started.

Oracles (tolerances per engine dtype, OracleConfig):
  crash        an exception from the engine, keyed like rollout_lab.crash (type @ innermost vLLM frames)
  reference    |vLLM logprob - transformers float32 teacher-forced logprob| of each sampled token
  metamorphic  |sampled logprob - the same sequence re-scored alone| on the same engine: one
               request at a time, a prefill with prompt_logprobs (which never reads the prefix
               cache), so no batch, no cached prefix, no preemption, no decode path; the
               flagged, preempted and prefix-cached sequences and the longest ordinary one
  batch_invariance
               a greedy or seeded request of the batch sampled again alone, compared bitwise
               (hunt/batch_oracle.py): a failure where vLLM promises invariance
               (VLLM_BATCH_INVARIANT=1 on a supported GPU: 4 requests every trial), else the
               noise floor (1 request, on the engine's first trial that has one: a measurement
               for the report, never a failure)
A start that vLLM refuses (its config validation, or an unsupported combination: compat.is_rejection)
is "rejected", not a bug; any other exception at start is a crash.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rollout_lab import compat, engine, pressure
from rollout_lab.hunt.protocol import (EngineStarted, EngineStarting, Heartbeat, OutOfTime, TrialEvent, TrialFinished,
                                       TrialResult, TrialStarted, event_line)
from rollout_lab.hunt.space import OracleConfig, engine_args, engine_env, sampling_args
from rollout_lab.hunt.trace import RejectedWorkload, drive, request_seed, trace_params, trace_requests, trial_case
from rollout_lab.hunt.workloads import Limits, TraceRequest, is_batch, make_trace, token_pool
from rollout_lab.invariance import output_of
from rollout_lab.minimize.standalone import Request
from rollout_lab.oracles import Trial, get, measure_trial, trial_oracles
from rollout_lab.tolerances import oracle_row

# Sequences re-scored alone per trial by the metamorphic oracle (the most suspicious first).
RESCORE_MAX = 8
# Ordinary sequences (not flagged, preempted or prefix-cached) among them: re-scoring one alone already
# checks the sampled path against the prompt_logprobs path on that engine; each more costs a prefill.
RESCORE_ORDINARY = 1
# Seconds between heartbeat lines (engine steps so far) while a group runs.
HEARTBEAT_S = 10.0


@dataclass
class GroupSpec:
    """What the driver hands the group's process (through Ray): the engine and its trials."""

    group_key: str
    engine: dict
    model_path: str
    # (trial key, workload point) of each trial, in order.
    trials: list[tuple[str, dict]]
    # time.time() after which no trial is started: the hunt's budget is a hard limit.
    deadline: float
    fault: Optional[str] = None
    fault_params: dict = field(default_factory=dict)
    oracles: OracleConfig = field(default_factory=OracleConfig)  # each oracle's tolerance rows
    threads: int = 0


class Lines:
    """The group's event file: one event per line, flushed at once (the heartbeat thread writes too)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def emit(self, event: TrialEvent) -> None:
        with self.lock, self.path.open("a") as f:
            f.write(event_line(event))
            f.flush()
            os.fsync(f.fileno())


def count_engine_steps(llm) -> dict:
    """Wrap the engine's step() with a counter: {"steps": n}, read by the heartbeat (the reference's
    batches count too: a long teacher-forced pass takes no engine step but is progress)."""
    counter = {"steps": 0}

    def count() -> None:
        counter["steps"] += 1

    compat.wrap_step(llm, count)
    return counter


def heartbeat(lines: Lines, counter: dict, group: str) -> None:
    """Every HEARTBEAT_S, the engine step count: the driver calls a trial hung only when it stops rising."""

    def beat():
        while True:
            time.sleep(HEARTBEAT_S)
            lines.emit(Heartbeat(group, counter["steps"]))

    threading.Thread(target=beat, daemon=True).start()


@dataclass
class Scored:
    """One sampled completion and what the oracles say about it."""

    request: int
    completion: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    num_preemptions: Optional[int]  # None: this vLLM keeps no per-request count
    num_cached_tokens: int
    seed: Optional[int]
    reference: list[float] = field(default_factory=list)
    rescored: list[float] = field(default_factory=list)

    def diffs(self, other: list[float]) -> list[float]:
        return [abs(a - b) for a, b in zip(self.logprobs, other)]


def request_index(sampled: engine.SampledOutput) -> int:
    """The trace index of a finished request: a step-driven trace names its requests "<trial>-<index>";
    LLM.generate numbers them from a counter that runs on across calls, and returns them in order."""
    return int(sampled.request_id.rsplit("-", 1)[1]) if "-" in sampled.request_id else sampled.request


def collect(outputs: list[engine.SampledOutput], workload: dict) -> list[Scored]:
    return [Scored(request_index(s), s.completion, s.prompt_token_ids, s.token_ids, s.logprobs, s.num_preemptions,
                   s.num_cached_tokens, request_seed(workload, request_index(s))) for s in outputs]


def rescore(llm, items: list[Scored]) -> None:
    """Each item's sequence re-scored alone: the logprob of each completion token as a prompt token."""
    for item in items:
        sequence = item.prompt_token_ids + item.token_ids
        if len(sequence) >= compat.vllm_config(llm).model_config.max_model_len:
            sequence = sequence[:-1]
        # engine.prompt_logprobs starts at position 1: the first completion token's is at len(prompt) - 1.
        item.rescored = engine.prompt_logprobs(llm, sequence)[len(item.prompt_token_ids) - 1 :]


def is_ordinary(item: Scored, tolerance: float) -> bool:
    """Neither flagged by the reference, nor preempted, nor a prefix-cache hit."""
    return (max(item.diffs(item.reference), default=0.0) <= tolerance and not compat.was_preempted(item.num_preemptions)
            and item.num_cached_tokens == 0)


def to_rescore(items: list[Scored], tolerance: float) -> list[Scored]:
    """What the metamorphic oracle re-scores: every suspicious sequence (suspicious_first) and the
    RESCORE_ORDINARY longest ordinary ones (most positions checked), at most RESCORE_MAX in all."""
    ordered = suspicious_first(items, tolerance)
    ordinary = sorted((s for s in ordered if is_ordinary(s, tolerance)),
                      key=lambda s: -(len(s.prompt_token_ids) + len(s.token_ids)))[:RESCORE_ORDINARY]
    return [s for s in ordered if not is_ordinary(s, tolerance) or s in ordinary][:RESCORE_MAX]


def suspicious_first(items: list[Scored], tolerance: float) -> list[Scored]:
    """Flagged by the reference (worst first), then preempted, then prefix-cached, then the rest;
    stable within each class. Re-scoring a flagged sequence alone tells an engine that computes it
    wrong from a batch, cache or decode path that does."""
    def key(s: Scored) -> tuple:
        worst = max(s.diffs(s.reference), default=0.0)
        return -worst if worst > tolerance else 0.0, -compat.was_preempted(s.num_preemptions), -(s.num_cached_tokens > 0)

    return sorted(items, key=key)


def run_trial(llm, reference, spec: GroupSpec, workload: dict, trace: list[TraceRequest], trial: str,
              dtype: str, progress: Optional[dict] = None, measure_floor: bool = True) -> TrialResult:
    """One workload on the (reset) engine, judged by every registered oracle (`measure_floor`: batch_invariance's)."""
    from rollout_lab.reference import reference_logprobs

    t0 = time.perf_counter()
    outputs, aborted = drive(llm, trace, workload, trial)
    items = collect(outputs, workload)
    t1 = time.perf_counter()
    # An fp8 KV cache has a tolerance row of its own, whatever the engine dtype.
    row = oracle_row(dtype, spec.engine.get("engine.kv_cache_dtype"))
    tolerance = get("reference").tolerance(spec.oracles, row)

    def count_batch() -> None:  # the heartbeat's progress counter
        progress["steps"] += 1

    if reference is not None and items:
        refs = reference_logprobs(reference, [(s.prompt_token_ids, s.token_ids) for s in items],
                                  on_batch=count_batch if progress is not None else None)
        for item, ref in zip(items, refs):
            item.reference = ref
    t2 = time.perf_counter()
    rescore(llm, to_rescore(items, tolerance))
    t3 = time.perf_counter()
    params = trace_params(trace, workload)
    sampled = [(s.prompt_token_ids, params[request_index(s)], output_of(s)) for s in outputs if s.completion == 0 and s.logprobs]
    oracles = measure_trial(Trial(llm, items, {o.name: o.tolerance(spec.oracles, row) for o in trial_oracles()}, sampled, measure_floor))
    t4 = time.perf_counter()
    result = TrialResult(
        "fail" if any(get(name).flagged(verdict) for name, verdict in oracles.items()) else "ok",
        dtype=dtype,
        oracles=oracles,
        num_requests=len(trace),
        num_aborted=len(aborted),
        num_tokens=sum(len(s.token_ids) for s in items),
        preempted_requests=sum(1 for s in items if compat.was_preempted(s.num_preemptions)),
        cached_requests=sum(1 for s in items if s.num_cached_tokens > 0),
        batch=is_batch(trace),
        phase_seconds={"engine": round(t1 - t0, 2), "reference": round(t2 - t1, 2), "rescore": round(t3 - t2, 2),
                       "alone": round(t4 - t3, 2)},
    )
    if result.status == "fail":
        # A step-driven trace keeps its schedule, the aborted requests too; a batch, the completions it judged.
        requests = failing_requests(items) if is_batch(trace) else trace_requests(trace, workload)
        result.case = trial_case(spec.engine, workload, requests)
    return result


def failing_requests(items: list[Scored]) -> list[Request]:
    """The requests that completed, all at once: the k-th of n completions with its seed + k, as vLLM
    seeds it; one sent without a seed (None) drew from the engine's RNG, and so does its replay."""
    return [Request(s.prompt_token_ids, None if s.seed is None else s.seed + s.completion, s.request, s.completion)
            for s in items]


def run_group(spec: GroupSpec, lines_path: str) -> None:
    """The whole group in this process; every outcome goes to the lines file."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.update(engine_env(spec.engine))  # read when vLLM is imported, below
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    from rollout_lab.crash import crash_signature
    from rollout_lab.reference import load_reference

    lines = Lines(Path(lines_path))
    args = engine_args(spec.engine) | {"disable_log_stats": False}
    lines.emit(EngineStarting(spec.group_key, args))
    started = time.perf_counter()
    try:
        # A tensor-parallel group: engine.start gives vLLM's multiprocessing executor over this task's GPUs.
        llm = engine.start(model=spec.model_path, **args)
    except Exception as exc:
        lines.emit(EngineStarted(spec.group_key, "rejected" if compat.is_rejection(exc) else "crash",
                                 time.perf_counter() - started, crash=crash_signature(exc, phase="engine_start"),
                                 message=engine.rejection_message(exc)))
        return
    config = compat.vllm_config(llm)
    dtype = str(config.model_config.dtype).removeprefix("torch.")
    limits = Limits(config.model_config.max_model_len, config.scheduler_config.max_num_batched_tokens,
                    config.cache_config.block_size, int(config.cache_config.num_gpu_blocks or 0))
    lines.emit(EngineStarted(spec.group_key, "ok", time.perf_counter() - started, dtype, config.cache_config.num_gpu_blocks))
    engine.remember_clean(llm)
    counter = count_engine_steps(llm)
    heartbeat(lines, counter, spec.group_key)
    pool = token_pool(llm.get_tokenizer())
    reference = load_reference(spec.model_path)
    # The batch-composition noise floor, where vLLM promises no invariance: one measurement an engine.
    floor = {"measured": False}

    def run_one(i: int, trial: str, workload: dict) -> TrialResult:
        max_tokens = int(sampling_args(workload).get("max_tokens", 16))
        trace = make_trace(workload["generator"], int(workload["seed"]), pool, limits, max_tokens)
        try:
            trace_params(trace, workload)
        except RejectedWorkload as exc:
            return TrialResult("rejected", message=str(exc))
        try:
            if i:
                engine.reset(llm)
            # The pressure preset's block_pool_head (hunt.space.with_pressure): the trial gets the top ids first.
            pressure.move_pool_head(llm, spec.engine.get("block_pool_head"))
            if spec.fault:
                engine.install_fault(llm, spec.fault, spec.fault_params)
            result = run_trial(llm, reference, spec, workload, trace, trial, dtype, counter, not floor["measured"])
            # The noise floor: requests some oracle ran again alone (batch_invariance's).
            floor["measured"] |= any(v.requests > 0 for v in result.oracles.values())
            return result
        except BaseException as exc:  # SystemExit too: vLLM ends a dead engine core that way
            return TrialResult("crash", dtype=dtype, crash=crash_signature(exc),
                               case=trial_case(spec.engine, workload, trace_requests(trace, workload)))

    run_trials(spec, lines, run_one)


def run_trials(spec: GroupSpec, lines: Lines, run_one: Callable[[int, str, dict], TrialResult],
               clock: Callable[[], float] = time.time) -> None:
    """The group's trials in turn, each its start and result line, until one crashes the engine; none
    is started once `clock()` reaches the spec's deadline (a trial in flight then still finishes)."""
    for i, (trial, workload) in enumerate(spec.trials):
        if clock() >= spec.deadline:
            lines.emit(OutOfTime(spec.group_key, trial))
            return
        lines.emit(TrialStarted(spec.group_key, trial))
        t0 = time.perf_counter()
        result = run_one(i, trial, workload)
        result.seconds = time.perf_counter() - t0
        lines.emit(TrialFinished(spec.group_key, trial, workload, result))
        if result.status == "crash":
            return
