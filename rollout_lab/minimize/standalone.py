"""One trial of a case: one vllm.LLM, a transformers float32 reference, the predicate.

The emitted repro.py (script.py) states the same predicate in a few lines of its own.

    Case (model, engine args, fault, requests) -> sample (vLLM) -> the expected failure's oracle
        (rollout_lab/oracles/: rerun, judge) -> Outcome (crash key, flagged tokens) -> same_failure
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from typing import Optional

from rollout_lab import engine, pressure, stepping
from rollout_lab.oracles.base import Expected, Replay
from rollout_lab.oracles.records import Outcome
# Where hunt/runner.py imports it.
from rollout_lab.oracles.records import request_class  # noqa: F401


@dataclass
class Request:
    """One sampled completion: the prompt's token ids and the request's own sampling seed."""

    prompt_token_ids: list[int]
    # None: sampled from the engine's RNG, which the engine's `seed` argument seeds.
    seed: Optional[int]
    # Coordinates in the run the case came from (reports only).
    prompt_index: int = -1
    sample_index: int = -1
    # Its schedule (a hunt trial's step-driven trace; rollout_lab/stepping.py's clock): added before engine
    # step `arrive_step`, aborted after step `abort_step` (None: it runs to completion). A case whose
    # requests all arrive at 0 and none is aborted runs in one generate call.
    arrive_step: int = 0
    abort_step: Optional[int] = None


@dataclass
class Case:
    """Everything one trial, or a repro.py, runs."""

    model: str
    # vllm.LLM keyword arguments besides `model`; a knob left out takes vLLM's default.
    engine_args: dict
    requests: list[Request]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # A planted fault from rollout_lab/faults.py, installed through collective_rpc; None: vLLM as shipped.
    fault: Optional[str] = None
    fault_params: dict = field(default_factory=dict)
    # vLLM environment variables (VLLM_BATCH_INVARIANT, ...), set before vLLM is imported: vLLM
    # reads some at import and caches them all once an engine runs, so one process has one env.
    env: dict[str, str] = field(default_factory=dict)
    # Where the engine's free block queue starts before the requests, as a fraction of its blocks (a
    # pressure preset's block_pool_head, rollout_lab/pressure.py): they get the top block ids and
    # state slots first, as on a big cache. None: a fresh engine's order, lowest ids first.
    block_pool_head: Optional[float] = None
    # The engine's history the failure needs (emit.py finds it when the case passes in a fresh
    # process): requests sampled first, in one generate call of warmup_max_tokens tokens each, and
    # not judged. Empty: a fresh engine.
    warmup: list[Request] = field(default_factory=list)
    warmup_max_tokens: int = 0


def same_failure(expected: Expected, outcome: Outcome) -> bool:
    """The predicate: the expected failure's oracle sees it again in `outcome`."""
    return expected.oracle.same_failure(expected, outcome)


def crash_outcome(exc: BaseException) -> Outcome:
    """An exception as an outcome, keyed the way rollout_lab.crash keys a run's crash."""
    from rollout_lab.crash import crash_signature

    signature = crash_signature(exc)
    return Outcome(crash_key=signature.key, crash_message=signature.message)


def start_engine(case: Case, with_fault: bool):
    """A vllm.LLM for the case, in this process, with the case's planted fault installed."""
    # Read when vLLM is imported and when the engine starts: keep the engine core in-process, so
    # collective_rpc can hand it a plain function.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = engine.start(model=case.model, **case.engine_args)
    if with_fault and case.fault is not None:
        engine.install_fault(llm, case.fault, case.fault_params)
    return llm


def sample(llm, case: Case) -> list[engine.SampledOutput]:
    """vLLM's completions for the case's requests, in request order, with sampled-token logprobs; the
    free block queue first moved to the case's block_pool_head, as the RL job moves it before a step."""
    params = [engine.sampling_params(request.seed, n=1, max_tokens=case.max_tokens, temperature=case.temperature,
                                     top_p=case.top_p, top_k=case.top_k, logprobs=0) for request in case.requests]
    pressure.move_pool_head(llm, case.block_pool_head)
    prompts = [request.prompt_token_ids for request in case.requests]
    if not is_scheduled(case.requests):
        return engine.generate(llm, prompts, params)
    # The aborted requests leave no output: the others come back in request order, as from generate.
    return stepping.drive(llm, prompts, params, [r.arrive_step for r in case.requests],
                          [r.abort_step for r in case.requests], "case")[0]


def is_scheduled(requests: list[Request]) -> bool:
    """Whether the requests need the engine stepped (an arrival after step 0 or an abort), not one generate call."""
    return any(r.arrive_step or r.abort_step is not None for r in requests)


def completed(case: Case) -> list[Request]:
    """The requests the case's schedule does not abort: those whose outputs it judges, in order."""
    return [r for r in case.requests if r.abort_step is None]


def run_case(llm, reference, case: Case, expected: Expected, worst: int = 10) -> Outcome:
    """Sample the case on `llm` (and whatever else the expected failure's oracle reruns on it), and
    let that oracle judge it; an exception from the engine is a crash outcome."""
    oracle = expected.oracle
    try:
        if case.warmup:
            sample(llm, replace(case, requests=case.warmup, max_tokens=case.warmup_max_tokens, warmup=[]))
        outputs = sample(llm, case)
        reruns = oracle.rerun(lambda requests: sample(llm, replace(case, requests=requests)), case, expected)
    except Exception as exc:  # the engine's exception is the result
        return crash_outcome(exc)
    return oracle.judge(Replay(case, outputs, reruns, reference, worst), expected)


def environment() -> dict[str, str]:
    """Versions and hardware a bug report needs."""
    import torch
    import transformers
    import vllm

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores)",
        "gpu": gpu,
    }
