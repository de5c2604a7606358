"""The reduction: shrink every dimension of a failing case while it keeps failing the same way.

    FailingRun -> calibrate (run the original case; choose the k-of-n rule)
      -> workload, on one engine: prompts (ddmin), samples per prompt, max_tokens, prompt length
         (bisection each)
      -> engine knobs back to vLLM's defaults: all at once first, else ddmin over the knobs that
         differ (each candidate starts an engine)
      -> workload again on the final engine when a knob went back, or when an explicit KV cache
         size matters: then a candidate with fewer requests gets a proportionally smaller cache
         (down to what one max_model_len request needs), so that the memory pressure the
         failure needs stays: kv_tight's 24 MB for 32 requests is 12 MB for 16
      -> Reduction

What a direct case already drops from the run: Ray and the workers (one vllm.LLM), the trainer
(a transformers float32 forward pass), the RL steps (the run's initial weights, fixed), and
rollout_lab's scheduler hook and worker extension.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from rich.console import Console

from rollout_lab.config import EngineConfig
from rollout_lab.minimize.ddmin import ddmin, smallest_failing
from rollout_lab.minimize.predicate import FailingRun
from rollout_lab.minimize.standalone import Case, Outcome
from rollout_lab.minimize.trials import Rule, TrialRecord, TrialRunner, calibrated_rule, case_key

# Engine knobs walked back to their defaults, with the vllm.LLM arguments each one covers.
KNOB_ARGS = {
    "cache_size": ("kv_cache_memory_bytes", "gpu_memory_utilization"),
    "block_size": ("block_size",),
    "max_num_seqs": ("max_num_seqs",),
    "max_num_batched_tokens": ("max_num_batched_tokens",),
    "max_model_len": ("max_model_len",),
    "enable_prefix_caching": ("enable_prefix_caching",),
    "enable_chunked_prefill": ("enable_chunked_prefill",),
    "enforce_eager": ("enforce_eager",),
}


def knob_targets(on_gpu: bool) -> dict[str, dict]:
    """The arguments each knob goes back to; {} leaves them out, which is vLLM's default."""
    targets: dict[str, dict] = {knob: {} for knob in KNOB_ARGS}
    if not on_gpu:
        # vLLM's default gpu_memory_utilization=0.9 reserves 90% of host RAM on the CPU backend:
        # the lab's default stands in for it.
        targets["cache_size"] = {"gpu_memory_utilization": EngineConfig.gpu_memory_utilization}
        # vLLM's default (enforce_eager=False) compiles the model with inductor on the CPU
        # backend: ~145 s per engine start on 2 cores, beyond a repro's budget.
        targets["enforce_eager"] = {"enforce_eager": True}
    return targets


def deviating_knobs(engine_args: dict, targets: dict[str, dict]) -> list[str]:
    """The knobs whose arguments differ from their targets."""
    return [
        knob
        for knob, names in KNOB_ARGS.items()
        if {n: engine_args[n] for n in names if n in engine_args} != targets[knob]
    ]


def with_knobs(engine_args: dict, keep: list[str], targets: dict[str, dict]) -> dict:
    """Engine arguments with every knob outside `keep` set back to its target."""
    args = dict(engine_args)
    for knob, names in KNOB_ARGS.items():
        if knob not in keep:
            for name in names:
                args.pop(name, None)
            args |= targets[knob]
    return args


def prompt_indices(case: Case) -> list[int]:
    """The case's prompts, in request order."""
    return list(dict.fromkeys(r.prompt_index for r in case.requests))


def with_prompts(case: Case, prompts: list[int]) -> Case:
    keep = set(prompts)
    return replace(case, requests=[r for r in case.requests if r.prompt_index in keep])


def with_samples(case: Case, samples: int) -> Case:
    return replace(case, requests=[r for r in case.requests if r.sample_index < samples])


def with_prompt_len(case: Case, length: int) -> Case:
    """Each prompt cut to its last `length` tokens: the chat turn's end, which the model answers, stays."""
    return replace(case, requests=[replace(r, prompt_token_ids=r.prompt_token_ids[-length:]) for r in case.requests])


def with_cache_share(candidate: Case, start: Case, floor: int) -> Case:
    """The candidate with start's kv_cache_memory_bytes times its share of start's requests, at least `floor`."""
    share = len(candidate.requests) / len(start.requests)
    cache = max(int(start.engine_args["kv_cache_memory_bytes"] * share), floor)
    return replace(candidate, engine_args=candidate.engine_args | {"kv_cache_memory_bytes": cache})


@dataclass
class Size:
    """How big a case is, in the dimensions the reduction shrinks."""

    prompts: int
    samples_per_prompt: int
    requests: int
    max_tokens: int
    prompt_tokens: int
    knobs: list[str]

    @classmethod
    def of(cls, case: Case, targets: dict[str, dict]) -> "Size":
        return cls(
            prompts=len(prompt_indices(case)),
            samples_per_prompt=1 + max(r.sample_index for r in case.requests),
            requests=len(case.requests),
            max_tokens=case.max_tokens,
            prompt_tokens=max(len(r.prompt_token_ids) for r in case.requests),
            knobs=deviating_knobs(case.engine_args, targets),
        )

    def describe(self) -> str:
        knobs = ", ".join(self.knobs) or "none"
        return (
            f"{self.prompts} prompts x {self.samples_per_prompt} samples ({self.requests} requests), "
            f"max_tokens {self.max_tokens}, prompts <= {self.prompt_tokens} tokens, non-default knobs: {knobs}"
        )


@dataclass
class Reduction:
    """What the minimizer found: the minimal case, how it got there, and what it cost."""

    run: FailingRun
    case: Case
    rule: Rule
    before: Size
    after: Size
    targets: dict[str, dict]
    # Every trial of this minimization, earlier sessions' included.
    records: list[TrialRecord] = field(default_factory=list)
    new_trials: int = 0
    seconds: float = 0.0

    def final_outcome(self) -> Optional[Outcome]:
        """The outcome of the last failing run of the minimal case."""
        key = case_key(self.case, self.run.expected)
        failing = [r for r in self.records if r.failed and r.key == key]
        return failing[-1].result() if failing else None


class Reducer:
    """Runs the passes over one FailingRun through a TrialRunner."""

    def __init__(self, trials: TrialRunner, targets: dict[str, dict]):
        self.trials, self.targets = trials, targets

    def fails(self, case: Case, stage: str, change: str) -> bool:
        return self.trials.fails(case, stage, change, asdict(Size.of(case, self.targets)))

    def calibrate(self, case: Case, runs: int) -> int:
        """How many of `runs` runs of the original case fail."""
        size = asdict(Size.of(case, self.targets))
        return sum(self.trials.run(case, "calibrate", f"original case, run {i + 1}/{runs}", size, i).failed for i in range(runs))

    def workload(self, case: Case, scale_cache: bool = False) -> Case:
        """Prompts, samples per prompt, max_tokens and prompt length, in that order.

        With scale_cache, a candidate with fewer requests gets a KV cache (kv_cache_memory_bytes)
        smaller in proportion, so the memory pressure a failure needs stays where it was; never
        smaller than what one max_model_len request needs, or the engine would not start.
        """
        floor = self.trials.min_cache_bytes(case) if scale_cache else 0

        def shrink(candidate: Case, start: Case) -> Case:
            return with_cache_share(candidate, start, floor) if scale_cache else candidate

        def change(text: str, candidate: Case, start: Case) -> str:
            if not scale_cache:
                return text
            return f"{text} (KV cache {start.engine_args['kv_cache_memory_bytes']} -> {candidate.engine_args['kv_cache_memory_bytes']} B)"

        start, prompts = case, prompt_indices(case)

        def prompts_fail(subset: list[int]) -> bool:
            candidate = shrink(with_prompts(start, subset), start)
            return self.fails(candidate, "prompts", change(f"prompts {len(prompts)} -> {len(subset)}: {subset}", candidate, start))

        case = shrink(with_prompts(start, ddmin(prompts, prompts_fail)), start)

        start, samples = case, Size.of(case, self.targets).samples_per_prompt

        def samples_fail(n: int) -> bool:
            candidate = shrink(with_samples(start, n), start)
            return self.fails(candidate, "samples", change(f"samples per prompt {samples} -> {n}", candidate, start))

        case = shrink(with_samples(start, smallest_failing(1, samples, samples_fail)), start)

        tokens = case.max_tokens
        best = smallest_failing(1, tokens, lambda n: self.fails(replace(case, max_tokens=n), "max_tokens", f"max_tokens {tokens} -> {n}"))
        case = replace(case, max_tokens=best)

        length = Size.of(case, self.targets).prompt_tokens
        best = smallest_failing(1, length, lambda n: self.fails(with_prompt_len(case, n), "prompt_len", f"prompt tokens {length} -> last {n}"))
        return with_prompt_len(case, best)

    def knobs(self, case: Case) -> Case:
        """Engine knobs back to their targets: all at once if that still fails, else by ddmin."""
        knobs = deviating_knobs(case.engine_args, self.targets)
        if not knobs:
            return case

        def fails(keep: list[str]) -> bool:
            reset = [k for k in knobs if k not in keep]
            change = f"to default: {', '.join(reset)}" + (f"; kept: {', '.join(keep)}" if keep else "")
            return self.fails(replace(case, engine_args=with_knobs(case.engine_args, keep, self.targets)), "knobs", change)

        keep = [] if fails([]) else ddmin(knobs, fails)
        return replace(case, engine_args=with_knobs(case.engine_args, keep, self.targets))


def minimize(run: FailingRun, trials: TrialRunner, targets: dict[str, dict], calibration_runs: int,
             rule: Optional[Rule], console: Console) -> Reduction:
    """Shrink the run's failing case; raises ValueError when the original case does not fail directly."""
    started = time.perf_counter()
    reducer = Reducer(trials, targets)
    case = run.case
    failures = reducer.calibrate(case, calibration_runs)
    if failures == 0:
        raise ValueError(
            f"the failure of {run.run_dir} did not reproduce in {calibration_runs} runs of step {run.step} on a "
            f"direct engine with the run's initial weights; it may need the RL updates or the trainer"
        )
    trials.rule = rule or calibrated_rule(failures, calibration_runs)
    console.print(f"[bold]rule[/]: {trials.rule.describe()} (original case failed {failures}/{calibration_runs})")
    case = reducer.workload(case)
    reduced = reducer.knobs(case)
    # When an explicit cache size matters (memory pressure), fewer requests need a smaller cache.
    scale_cache = "cache_size" in deviating_knobs(reduced.engine_args, targets) and "kv_cache_memory_bytes" in reduced.engine_args
    if reduced.engine_args != case.engine_args or scale_cache:
        case = reducer.workload(reduced, scale_cache)
    trials.close()
    return Reduction(
        run=run,
        case=case,
        rule=trials.rule,
        before=Size.of(run.case, targets),
        after=Size.of(case, targets),
        targets=targets,
        records=trials.records,
        new_trials=trials.new_trials,
        seconds=time.perf_counter() - started,
    )
