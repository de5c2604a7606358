"""The failure to keep, read from a run dir: the first failing step's recorded requests as a direct-engine Case.

A run failed by crashing (summary.json status "crash", a crash key) or silently (tokens whose
|sampler - trainer| logprob exceeds the spike threshold). The predicate that every smaller case
must still satisfy is `standalone.same_failure`: the same crash key; or at least one flagged
token, the flagged requests being of the same class (preempted / prefix_cached / any, see
`standalone.request_class`) as in the run. The threshold is the run's own spike threshold; clean
runs flag no token (rollout_lab/tolerances.py: the measured clean maxima lie an order of magnitude
below it), so any flagged token is a rate above the clean one. The case's requests are the ones the run sent (<run_dir>/requests/), seeds included:
a request the run sampled from the engine's RNG has seed None, and the case's engine the run's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rollout_lab.config import RunConfig, fault_params
from rollout_lab.crash import CrashSignature
from rollout_lab.minimize.standalone import Case, Expected, Request, request_class
from rollout_lab.records import RecordsError, SampledRequest, read_config, read_records, read_requests, read_summary
from rollout_lab.engine import engine_kwargs
from rollout_lab.tolerances import threshold_for

# rollout_lab's own plumbing in engine_kwargs, which a direct engine with fixed weights does not need.
LAB_ENGINE_ARGS = ("worker_extension_cls", "scheduler_cls")
# Crash phases a direct engine can replay; weight_sync and actor crashes need the trainer and Ray.
REPLAYABLE_PHASES = ("engine_start", "generate")


class RunDirError(ValueError):
    """A run dir the minimizer cannot start from; the message names the dir and the reason."""


@dataclass
class FailingRun:
    """A failed run, as the first case to shrink and the failure to keep."""

    run_dir: Path
    run_id: str
    config: RunConfig
    # The RL step whose sampling failed; its requests, with the run's initial weights, are the case.
    step: int
    case: Case
    expected: Expected
    # One line: what failed in the run.
    description: str
    # Where the run's flagged tokens sat, from its scheduling records ("" where there are none).
    placement: str = ""
    # Where the case came from, for messages: "RL run" (a run dir) or "hunt trial" (a hunt's case.json).
    origin: str = "RL run"


def direct_engine_args(cfg: RunConfig, model_path: str) -> dict:
    """vllm.LLM keyword arguments of the run's engine, less rollout_lab's plumbing and the model."""
    kwargs = engine_kwargs(cfg, model_path)
    for key in (*LAB_ENGINE_ARGS, "model"):
        kwargs.pop(key, None)
    # Per-request preemption counts come with the stats; the request class needs them.
    kwargs["disable_log_stats"] = False
    return kwargs


def placement(flagged) -> str:
    """Where flagged tokens (rows of the token table) sat: requests, first bad position, KV blocks, state slots."""
    requests = flagged.groupby("request_id").agg(first=("position", "min"), preempted=("num_preemptions", "first"),
                                                 cached=("num_cached_tokens", "first"))
    # A null count (vLLM before 0.30) is unknown: say so rather than count the request as not preempted.
    preempted = "preemptions unknown" if requests.preempted.isna().all() else f"{int((requests.preempted > 0).sum())} preempted"
    parts = [f"{len(requests)} flagged requests ({preempted}, "
             f"{int((requests.cached > 0).sum())} prefix-cache hits), first bad position {int(requests['first'].min())}"]
    for column, what in (("kv_block", "KV blocks"), ("state_slot", "state slots")):
        values = sorted({int(v) for v in flagged[column].dropna()})
        if values:
            parts.append(f"{what} {values[0]}-{values[-1]} ({len(values)} distinct)")
    resumed = flagged.preemptions_before.dropna()
    if len(resumed):
        parts.append(f"{int((resumed > 0).sum())}/{len(resumed)} flagged tokens sampled after their request's preemption")
    return "; ".join(parts)


def _silent_failure(run_dir: Path, threshold: float) -> tuple[int, int, str, str, str]:
    """(step, worker, request class, description, placement) of the run's first flagged step."""
    try:
        table = read_records(run_dir).to_pandas()
    except RecordsError as exc:
        raise RunDirError(str(exc)) from None
    flagged = table[table.abs_diff > threshold]
    if flagged.empty:
        raise RunDirError(
            f"run {run_dir} did not fail: no crash, and none of its {len(table)} tokens is above the "
            f"spike threshold {threshold:g}"
        )
    step = int(flagged.step.min())
    at_step = flagged[flagged.step == step]
    worker = int(at_step.worker.value_counts().idxmax())
    at_step = at_step[at_step.worker == worker]
    requests = at_step.groupby("request_id")[["num_preemptions", "num_cached_tokens"]].first()
    # A null count (vLLM before 0.30 keeps none) is unknown, never 0: such a request is 'any'.
    kind = request_class([(None if pd.isna(p) else int(p), int(c)) for p, c in requests.itertuples(index=False)])
    step_tokens = int(np.sum((table.step == step) & (table.worker == worker)))
    description = (
        f"{len(at_step)}/{step_tokens} tokens above {threshold:g} at step {step} (worker {worker}), "
        f"on {len(requests)} '{kind}' requests, max |diff| {at_step.abs_diff.max():.3g}"
    )
    return step, worker, kind, description, placement(at_step)


def _replayable_crash(run_dir: Path, crash: CrashSignature | None) -> CrashSignature:
    """The run's crash, if a direct engine can replay it."""
    if crash is None:
        raise RunDirError(f"run {run_dir} has status crash but its summary.json holds no crash signature")
    if crash.phase not in REPLAYABLE_PHASES:
        raise RunDirError(
            f"run {run_dir} crashed in phase {crash.phase!r}; the minimizer replays crashes in "
            f"{' or '.join(REPLAYABLE_PHASES)} only (the others need the trainer)"
        )
    return crash


def recorded_requests(run_dir: Path, step: int, worker: int | None) -> list[SampledRequest]:
    """The requests the run sent at `step` (to one worker, if given), as recorded."""
    if not (run_dir / "requests").is_dir():
        raise RunDirError(f"run dir {run_dir} has no requests/ (written before rollout_lab recorded the requests it "
                          "sampled): the minimizer replays them, run the job again to minimize it")
    try:
        requests = [r for r in read_requests(run_dir, step) if worker is None or r.worker == worker]
    except RecordsError as exc:
        raise RunDirError(str(exc)) from None
    if not requests:
        raise RunDirError(f"run dir {run_dir} recorded no requests of worker {worker} at step {step}")
    return requests


def replay_case(cfg: RunConfig, model_path: str, recorded: list[SampledRequest]) -> Case:
    """The recorded requests on a direct engine built like the run's (its seed included), with its planted
    fault and its block pool's head (the run moved it before every step)."""
    params = {(r.n, r.max_tokens, r.temperature, r.top_p, r.top_k, r.logprobs) for r in recorded}
    if len(params) != 1 or next(iter(params))[0] != 1:
        raise RunDirError(f"the recorded requests were sent with sampling params {sorted(params)}; a case replays "
                          "one (n, max_tokens, temperature, top_p, top_k, logprobs) with n=1")
    _, max_tokens, temperature, top_p, top_k, _ = params.pop()
    return Case(
        model=model_path,
        engine_args=direct_engine_args(cfg, model_path),
        requests=[Request(r.prompt_token_ids, r.seed, r.prompt_index, r.sample_index) for r in recorded],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        fault=cfg.fault.name,
        fault_params=fault_params(cfg.fault.name, dict(cfg.fault.params)) if cfg.fault.name else {},
        block_pool_head=cfg.block_pool_head,
    )


def load_run(run_dir: Path | str, threshold: float | None = None) -> FailingRun:
    """Read a failed run dir; raises RunDirError when it is missing, did not fail, or cannot be replayed.
    `threshold` replaces the run's spike threshold (0: any token not bitwise equal failed, the on-policy sense)."""
    from rollout_lab.models import resolve_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} does not exist")
    try:
        summary, cfg = read_summary(run_dir), read_config(run_dir)
    except RecordsError as exc:
        raise RunDirError(str(exc)) from None
    # The threshold that flagged the run's tokens; runs written before it was recorded use today's.
    if threshold is None:
        threshold = summary.spike_threshold if summary.spike_threshold is not None else threshold_for(cfg)[0]
    model_path = resolve_model(cfg.model.name)
    where = ""
    if summary.status == "crash":
        crash = _replayable_crash(run_dir, summary.crash)
        step = crash.step or 0
        expected = Expected("crash", threshold, crash_key=crash.key)
        description = f"crash at step {step} ({crash.phase}): {crash.key}: {crash.message}"
        if crash.phase == "engine_start":
            # An engine that did not start sampled nothing: one placeholder request stands in.
            recorded = [SampledRequest(step=0, worker=0, request_id=None, prompt_index=0, sample_index=0, prompt_token_ids=[0],
                                       seed=None, n=1, max_tokens=1, temperature=1.0, top_p=1.0, top_k=-1, logprobs=0)]
        else:
            # A crash does not say which request raised: replay all the failing engine sent.
            recorded = recorded_requests(run_dir, step, None)
    else:
        try:
            step, worker, kind, description, where = _silent_failure(run_dir, threshold)
        except RunDirError:
            if summary.status != "sync_mismatch":
                raise
            raise RunDirError(f"run {run_dir} failed its weight-sync check; that needs the trainer, not a direct engine") from None
        # A run whose sampled tokens were flagged before its weight-sync check failed: the flagged
        # tokens are the failure a direct engine can replay.
        expected = Expected("mismatch", threshold, request_class=kind)
        recorded = recorded_requests(run_dir, step, worker)
    case = replay_case(cfg, model_path, recorded)
    return FailingRun(run_dir, summary.run_id, cfg, step, case, expected, description, where)


def load_case(path: Path | str) -> FailingRun:
    """A failing case written by another tool (the hunt's findings/<name>/case.json, a
    handoff.CaseFile) as a FailingRun; its model is resolved here, where the minimizer runs."""
    from rollout_lab.minimize.handoff import CaseFile, HandoffError
    from rollout_lab.models import resolve_model

    path = Path(path)
    try:
        case_file = CaseFile.read(path)
    except HandoffError as exc:
        raise RunDirError(str(exc)) from None
    case = case_file.case
    cfg = RunConfig(run_name=path.parent.name)
    cfg.model.name = case_file.model
    cfg.fault.name, cfg.fault.params = case.fault, dict(case.fault_params)
    cfg.loop.steps = 1
    case.model = resolve_model(case_file.model)
    origin = "hunt trial" if case_file.description.startswith("hunt trial") else "case file"
    return FailingRun(path.parent, path.parent.name, cfg, 0, case, case_file.expected, case_file.description, origin=origin)
