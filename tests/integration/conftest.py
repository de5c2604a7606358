"""Runs several integration tests read: each is run once per session, the first time a test asks for it."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def stale_state_run(tmp_path_factory, ray_session, compose) -> Path:
    """`python -m rollout_lab fault=stale_state +pressure=kv_tight engine.seed_policy=engine workload.samples_per_prompt=2
    loop.steps=1 loop.check_weight_sync=false`: 8 prompts x 2 samples x 32 tokens sampled from the engine's RNG (no
    request has a seed). Half the default job's requests still overflow kv_tight's 16 blocks (4 preempted, ~60 tokens
    flagged) and minimize to the same case in a third less trial time; 4 x 4 preempted none (most samples end in under
    32 tokens). Read by test_faults (which requests go wrong) and test_minimize (what the run shrinks to)."""
    from rollout_lab.loop import run

    run_dir = tmp_path_factory.mktemp("stale_state_run")
    # No weight-sync check: the minimizer replays what was sampled, before any sync.
    cfg = compose("fault=stale_state", "+pressure=kv_tight", "engine.seed_policy=engine", "workload.samples_per_prompt=2",
                  "loop.steps=1", "loop.check_weight_sync=false", "logger.mode=disabled")
    cfg.run_dir = str(run_dir)
    run(cfg)
    return run_dir


@pytest.fixture(scope="session")
def overflow_run(tmp_path_factory, ray_session, compose) -> Path:
    """`python -m rollout_lab +pressure=many_slots fault=index_overflow loop.steps=1 loop.check_weight_sync=false
    workload.num_prompts=4 workload.max_tokens=16`: half the default job's prompts, 16 tokens each, still hand out
    blocks past the fault's threshold (16) to some requests and not to others. Read by test_localize (where the
    divergence starts) and test_faults (which requests go wrong), one engine run for both."""
    from rollout_lab.loop import run

    run_dir = tmp_path_factory.mktemp("overflow_run")
    cfg = compose("+pressure=many_slots", "fault=index_overflow", "loop.steps=1", "loop.check_weight_sync=false",
                  "logger.mode=disabled", "workload.num_prompts=4", "workload.max_tokens=16")
    cfg.run_dir = str(run_dir)
    result = run(cfg)
    assert result.status == "ok", result.crash
    return run_dir
