"""The failure to keep, read from a run dir: the first failing step as a direct-engine Case.

A run failed by crashing (summary.json status "crash", a crash key) or silently (tokens whose
|sampler - trainer| logprob exceeds the spike threshold). The predicate that every smaller case
must still satisfy is `standalone.same_failure`: the same crash key; or at least one flagged
token, the flagged requests being of the same class (preempted / prefix_cached / any, see
`standalone.request_class`) as in the run. The threshold is the run's own spike threshold; clean
runs flag no token (rollout_lab/tolerances.py: the measured clean maxima lie an order of magnitude
below it), so any flagged token is a rate above the clean one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rollout_lab.config import ConfigError, RunConfig, fault_params, validate
from rollout_lab.minimize.standalone import Case, Expected, Request, request_class
from rollout_lab.records import RecordsError, read_records
from rollout_lab.sampler import engine_kwargs, request_seed
from rollout_lab.tolerances import threshold_for
from rollout_lab.workload import encode_prompt, make_problems

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


def read_config(run_dir: Path) -> RunConfig:
    """The run's resolved config (config.json) as a RunConfig."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunDirError(f"run dir {run_dir} has no config.json")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), json.loads(path.read_text()))
        return validate(OmegaConf.to_object(merged))
    except (OmegaConfBaseException, ConfigError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} is not a valid rollout_lab config: {exc}".splitlines()[0]) from None


def direct_engine_args(cfg: RunConfig, model_path: str) -> dict:
    """vllm.LLM keyword arguments of the run's engine, less rollout_lab's plumbing and the model."""
    kwargs = engine_kwargs(cfg, model_path)
    for key in (*LAB_ENGINE_ARGS, "model"):
        kwargs.pop(key, None)
    # Per-request preemption counts come with the stats; the request class needs them.
    kwargs["disable_log_stats"] = False
    return kwargs


def step_requests(cfg: RunConfig, tokenizer, step: int, worker: int) -> list[Request]:
    """The requests one worker sampled at `step`, each with its per-request seed."""
    w = cfg.workload
    steps = cfg.loop.steps if w.rotate_prompts else 1
    problems = make_problems(max(w.num_prompts * steps, 1), w.prompt_seed)
    offset = step * w.num_prompts if w.rotate_prompts else 0
    # loop.run deals prompts to workers round-robin.
    indices = list(range(offset, offset + w.num_prompts))[worker :: cfg.loop.num_workers]
    return [
        Request(encode_prompt(tokenizer, problems[i]), request_seed(cfg.engine.seed, step, i, s), i, s)
        for i in indices
        for s in range(w.samples_per_prompt)
    ]


def placement(flagged) -> str:
    """Where flagged tokens (rows of the token table) sat: requests, first bad position, KV blocks, state slots."""
    requests = flagged.groupby("request_id").agg(first=("position", "min"), preempted=("num_preemptions", "first"),
                                                 cached=("num_cached_tokens", "first"))
    parts = [f"{len(requests)} flagged requests ({int((requests.preempted > 0).sum())} preempted, "
             f"{int((requests.cached > 0).sum())} prefix-cache hits), first bad position {int(requests['first'].min())}"]
    for column, what in (("kv_block", "KV blocks"), ("state_slot", "state slots")):
        values = sorted({int(v) for v in flagged[column].dropna()})
        if values:
            parts.append(f"{what} {values[0]}-{values[-1]} ({len(values)} distinct)")
    resumed = flagged.preemptions_before.dropna()
    if len(resumed):
        parts.append(f"{int((resumed > 0).sum())}/{len(resumed)} flagged tokens sampled after their request's preemption")
    return "; ".join(parts)


def _silent_failure(run_dir: Path, threshold: float) -> tuple[int, int, str, str, dict[int, int], str]:
    """(step, worker, request class, description, prompt length by prompt index, placement) of the first flagged step."""
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
    prompt_lens = table[table.step == step].groupby("prompt_index").prompt_len.first()
    return step, worker, kind, description, {int(i): int(n) for i, n in prompt_lens.items()}, placement(at_step)


def load_run(run_dir: Path | str) -> FailingRun:
    """Read a failed run dir; raises RunDirError when it is missing, did not fail, or cannot be replayed."""
    from transformers import AutoTokenizer

    from rollout_lab.models import resolve_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} does not exist")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RunDirError(f"run dir {run_dir} has no summary.json")
    summary = json.loads(summary_path.read_text())
    cfg = read_config(run_dir)
    # The threshold that flagged the run's tokens; runs written before it was recorded use today's.
    threshold = float(summary.get("spike_threshold") or threshold_for(cfg)[0])
    status, crash = summary.get("status"), summary.get("crash") or {}
    if status == "crash":
        phase = crash.get("phase")
        if phase not in REPLAYABLE_PHASES:
            raise RunDirError(
                f"run {run_dir} crashed in phase {phase!r}; the minimizer replays crashes in "
                f"{' or '.join(REPLAYABLE_PHASES)} only (the others need the trainer)"
            )
        step, worker, prompt_lens, where = crash.get("step") or 0, None, {}, ""
        expected = Expected("crash", threshold, crash_key=crash["key"])
        description = f"crash at step {step} ({phase}): {crash['key']}: {crash.get('message', '')}"
    else:
        try:
            step, worker, kind, description, prompt_lens, where = _silent_failure(run_dir, threshold)
        except RunDirError:
            if status != "sync_mismatch":
                raise
            raise RunDirError(f"run {run_dir} failed its weight-sync check; that needs the trainer, not a direct engine") from None
        # A run whose sampled tokens were flagged before its weight-sync check failed: the flagged
        # tokens are the failure a direct engine can replay.
        expected = Expected("mismatch", threshold, request_class=kind)

    model_path = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # A crash does not say which worker raised: replay all of the step's prompts on one engine.
    requests = [
        r
        for w in ([worker] if worker is not None else range(cfg.loop.num_workers))
        for r in step_requests(cfg, tokenizer, step, w)
    ]
    for r in requests:
        if prompt_lens.get(r.prompt_index, len(r.prompt_token_ids)) != len(r.prompt_token_ids):
            raise RunDirError(
                f"prompt {r.prompt_index} rebuilt from the workload config has {len(r.prompt_token_ids)} "
                f"tokens, but the records of {run_dir} say {prompt_lens[r.prompt_index]}"
            )
    w = cfg.workload
    case = Case(
        model=model_path,
        engine_args=direct_engine_args(cfg, model_path),
        requests=requests,
        max_tokens=w.max_tokens,
        temperature=w.temperature,
        top_p=w.top_p,
        top_k=w.top_k,
        fault=cfg.fault.name,
        fault_params=fault_params(cfg.fault.name, dict(cfg.fault.params)) if cfg.fault.name else {},
    )
    return FailingRun(run_dir, summary.get("run_id", run_dir.name), cfg, step, case, expected, description, where)


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
    return FailingRun(path.parent, path.parent.name, cfg, 0, case, case_file.expected, case_file.description)
