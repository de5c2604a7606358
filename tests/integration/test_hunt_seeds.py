"""A hunt trial sampled from the engine's RNG (per_request_seed false, half of the default and gpu
spaces) replays, as the minimizer runs its case, to the very tokens the trial sampled."""
from dataclasses import replace

import pytest

from rollout_lab import engine
from rollout_lab.hunt.runner import collect, failing_requests
from rollout_lab.hunt.trace import drive, trial_case
from rollout_lab.hunt.workloads import Limits, make_trace
from rollout_lab.minimize.standalone import sample
from rollout_lab.models import resolve_model

pytestmark = pytest.mark.integration


def test_an_unseeded_trials_case_replays_the_trials_tokens(monkeypatch):
    """Defect: the case gave each engine-RNG request an invented seed (i + completion), so the
    minimizer replayed other tokens than the trial sampled."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    point = {"model": "llama-tiny", "engine.dtype": "float32", "engine.max_model_len": 256, "engine.enforce_eager": True,
             "engine.kv_cache_memory_bytes": 16_000_000}
    workload = {"generator": "many_short", "seed": 5, "sampling.per_request_seed": False, "sampling.max_tokens": 8,
                "sampling.temperature": 1.0, "sampling.logprobs": 0}
    trace = make_trace("many_short", 5, list(range(100, 1100)), Limits(256, 2048, 32), 8)[:6]  # one batch
    case = trial_case(point, workload, [])
    llm = engine.start(model=resolve_model("llama-tiny"), **case.engine_args)
    engine.remember_clean(llm)
    outputs, _ = drive(llm, trace, workload, "t")
    case = replace(case, requests=failing_requests(collect(outputs, workload)))
    assert {r.seed for r in case.requests} == {None}
    engine.reset(llm)  # a fresh engine's state, its RNG seeded again: as the minimizer's next trial
    assert [r.token_ids for r in sample(llm, case)] == [s.token_ids for s in outputs]
    llm.llm_engine.engine_core.shutdown()
